//! SPEC section 3, one test per rule, against the pure shard.

mod support;

use deadbolt_core::limits::Limits;
use deadbolt_core::proto::{
    ErrorCode, Inserted, InsertedMany, Keys, Member, MembersPage, Okay, Reply, SetInfo, SetOp,
    SetUpReply, TornDown, encode_reply,
};
use deadbolt_core::shard::sets::{MEMBERS_PAGE_BYTES, json_escaped_len};
use support::Harness;

fn inserted(index: u64, first: bool) -> Okay {
    Okay::Inserted(Inserted { index, first })
}

fn members(h: &mut Harness, set: &str, after: u64, limit: u32) -> MembersPage {
    let op = SetOp::Members {
        set: set.to_owned(),
        after,
        limit,
    };
    match h.set_op("reader", op).ok() {
        Okay::Members(page) => page,
        other => panic!("{other:?}"),
    }
}

fn inspect_set(h: &mut Harness, set: &str) -> Result<SetInfo, ErrorCode> {
    let op = SetOp::Inspect {
        set: set.to_owned(),
    };
    match h.set_op("reader", op).outcome() {
        Ok(Okay::SetInfo(info)) => Ok(info),
        Ok(other) => panic!("{other:?}"),
        Err(e) => Err(e.code),
    }
}

fn tear_down(h: &mut Harness, set: &str) -> Result<u64, ErrorCode> {
    match h
        .set_op(
            "reader",
            SetOp::TearDown {
                set: set.to_owned(),
            },
        )
        .outcome()
    {
        Ok(Okay::TornDown(TornDown { size })) => Ok(size),
        Ok(other) => panic!("{other:?}"),
        Err(e) => Err(e.code),
    }
}

#[test]
fn set_up_creates_the_set_once_and_later_only_restarts_its_ttl() {
    let mut h = Harness::new();
    assert_eq!(
        h.set_up("s", 1000),
        Okay::SetUp(SetUpReply {
            created: true,
            size: 0
        })
    );
    h.insert("alice", "s", "a").unwrap();
    h.advance(900);
    assert_eq!(
        h.set_up("s", 1000),
        Okay::SetUp(SetUpReply {
            created: false,
            size: 1
        })
    );
    h.advance(999);
    assert_eq!(
        inspect_set(&mut h, "s").map(|i| i.size),
        Ok(1),
        "ttl restarted at 900"
    );
    h.advance(1);
    assert_eq!(inspect_set(&mut h, "s"), Err(ErrorCode::NoSuchSet));
    let counters = h.shard.counters().sets;
    assert_eq!((counters.created, counters.expired), (1, 1));
}

#[test]
fn set_up_can_shorten_the_ttl() {
    let mut h = Harness::new();
    h.set_up("s", 10_000);
    h.set_up("s", 10);
    h.advance(10);
    assert_eq!(inspect_set(&mut h, "s"), Err(ErrorCode::NoSuchSet));
}

#[test]
fn insert_into_a_set_that_does_not_exist_is_no_such_set() {
    let mut h = Harness::new();
    assert_eq!(
        h.insert("alice", "nope", "a").unwrap_err().code,
        ErrorCode::NoSuchSet
    );
    assert_eq!(inspect_set(&mut h, "nope"), Err(ErrorCode::NoSuchSet));
    assert_eq!(tear_down(&mut h, "nope"), Err(ErrorCode::NoSuchSet));
    let op = SetOp::Members {
        set: "nope".into(),
        after: 0,
        limit: 10,
    };
    assert_eq!(h.set_op("r", op).code(), ErrorCode::NoSuchSet);
}

#[test]
fn index_is_the_one_based_arrival_order_and_the_same_for_everyone() {
    let mut h = Harness::new();
    h.set_up("s", 10_000);
    assert_eq!(h.insert("alice", "s", "x").unwrap(), inserted(1, true));
    assert_eq!(h.insert("bob", "s", "y").unwrap(), inserted(2, true));
    assert_eq!(h.insert("carol", "s", "x").unwrap(), inserted(1, false));
    assert_eq!(h.insert("bob", "s", "z").unwrap(), inserted(3, true));
    assert_eq!(h.insert("alice", "s", "y").unwrap(), inserted(2, false));
}

#[test]
fn first_is_true_for_the_first_inserter_on_every_retry_and_false_for_everyone_else() {
    let mut h = Harness::new();
    h.set_up("s", 10_000);
    assert_eq!(h.insert("alice", "s", "k").unwrap(), inserted(1, true));
    assert_eq!(h.insert("bob", "s", "k").unwrap(), inserted(1, false));
    // Alice's retry after a lost reply, from a new connection.
    let op = SetOp::Insert {
        set: "s".into(),
        keys: Keys::One("k".into()),
    };
    assert_eq!(
        h.send("alice", 42, deadbolt_core::shard::ShardOp::Set(op))
            .ok(),
        inserted(1, true)
    );
    assert_eq!(h.insert("bob", "s", "k").unwrap(), inserted(1, false));
}

#[test]
fn sets_are_independent_of_each_other_and_of_lock_keys() {
    let mut h = Harness::new();
    h.set_up("s1", 10_000);
    h.set_up("s2", 10_000);
    h.insert("alice", "s1", "k").unwrap();
    assert_eq!(h.insert("bob", "s2", "k").unwrap(), inserted(1, true));
    h.lock("carol", "s1", 100, None).token();
    assert_eq!(h.insert("bob", "s1", "k").unwrap(), inserted(1, false));
}

#[test]
fn a_batch_is_applied_in_order_with_results_in_the_same_order() {
    let mut h = Harness::new();
    h.set_up("s", 10_000);
    h.insert("bob", "s", "b").unwrap();
    let keys = Keys::Many(vec!["a".into(), "b".into(), "a".into(), "c".into()]);
    let reply = h
        .set_op(
            "alice",
            SetOp::Insert {
                set: "s".into(),
                keys,
            },
        )
        .ok();
    let expected = vec![
        Inserted {
            index: 2,
            first: true,
        },
        Inserted {
            index: 1,
            first: false,
        },
        Inserted {
            index: 2,
            first: true,
        },
        Inserted {
            index: 3,
            first: true,
        },
    ];
    assert_eq!(
        reply,
        Okay::InsertedMany(InsertedMany { results: expected })
    );
}

#[test]
fn members_pages_through_keys_in_index_order() {
    let mut h = Harness::new();
    h.set_up("s", 10_000);
    for key in ["e", "d", "c", "b", "a"] {
        h.insert("alice", "s", key).unwrap();
    }
    let page = members(&mut h, "s", 0, 2);
    let expect = |pairs: &[(u64, &str)]| -> Vec<Member> {
        pairs
            .iter()
            .map(|(i, k)| Member {
                index: *i,
                key: (*k).to_owned(),
            })
            .collect()
    };
    assert_eq!(page.members, expect(&[(1, "e"), (2, "d")]));
    assert_eq!(page.next, Some(2));
    let page = members(&mut h, "s", 2, 2);
    assert_eq!(page.members, expect(&[(3, "c"), (4, "b")]));
    assert_eq!(page.next, Some(4));
    let page = members(&mut h, "s", 4, 2);
    assert_eq!(page.members, expect(&[(5, "a")]));
    assert_eq!(page.next, None);
    let page = members(&mut h, "s", 3, 2);
    assert_eq!(page.next, None, "nothing more after the last key");
    let page = members(&mut h, "s", 5, 2);
    assert_eq!((page.members.len(), page.next), (0, None));
    let page = members(&mut h, "s", 99, 2);
    assert_eq!((page.members.len(), page.next), (0, None));
}

#[test]
fn a_members_page_stops_at_its_byte_budget_and_next_resumes_there() {
    let mut h = Harness::new();
    h.set_up("s", 10_000);
    let keys: Vec<String> = (0..600)
        .map(|i| format!("{i:04}{}", "k".repeat(1020)))
        .collect();
    for key in &keys {
        h.insert("alice", "s", key).unwrap();
    }
    // 256 keys of exactly 1 KiB fill a page to the byte, and fit.
    assert_eq!(members(&mut h, "s", 0, 10_000).members.len(), 256);
    let mut seen = Vec::new();
    let mut after = 0;
    loop {
        let page = members(&mut h, "s", after, 10_000);
        let bytes: usize = page.members.iter().map(|m| m.key.len()).sum();
        assert!(bytes <= MEMBERS_PAGE_BYTES, "page of {bytes} bytes");
        seen.extend(page.members.into_iter().map(|m| m.key));
        match page.next {
            Some(next) => after = next,
            None => break,
        }
    }
    assert!(after > 0, "600 KiB of keys must take more than one page");
    assert_eq!(seen, keys, "every key once, in index order");
}

/// The reply that carries `page`, as the server writes it.
fn encoded(page: MembersPage) -> String {
    encode_reply(&Reply {
        id: Some(u64::MAX),
        outcome: Ok(Okay::Members(page)),
    })
}

#[test]
fn a_members_page_counts_keys_as_encoded_so_no_reply_passes_the_message_limit() {
    let mut h = Harness::new();
    h.set_up("s", 10_000);
    // 1 KiB keys of control characters, six bytes each once escaped: by
    // their raw length, 256 of them (1.5 MiB encoded) would fit a page.
    let keys: Vec<String> = (0..600)
        .map(|i| format!("{i:04}{}", "\u{1}".repeat(1020)))
        .collect();
    for key in &keys {
        h.insert("alice", "s", key).unwrap();
    }
    let (mut seen, mut after, mut pages) = (Vec::new(), 0, 0);
    loop {
        let page = members(&mut h, "s", after, 10_000);
        let escaped: usize = page.members.iter().map(|m| json_escaped_len(&m.key)).sum();
        assert!(
            escaped <= MEMBERS_PAGE_BYTES,
            "page of {escaped} encoded bytes"
        );
        seen.extend(page.members.iter().map(|m| m.key.clone()));
        let next = page.next;
        let reply = encoded(page).len();
        assert!(
            reply <= Limits::default().message_bytes_max,
            "a reply of {reply} bytes"
        );
        pages += 1;
        match next {
            Some(next) => after = next,
            None => break,
        }
    }
    assert!(
        pages >= 15,
        "3.6 MB encoded takes 15 pages of 256 KiB, not {pages}"
    );
    assert_eq!(seen, keys, "every key once, in index order");
}

#[test]
fn json_escaped_len_is_what_the_reply_encoder_writes() {
    let page = |key: &str| MembersPage {
        members: vec![Member {
            index: 1,
            key: key.to_owned(),
        }],
        next: None,
    };
    let empty = encoded(page("")).len();
    let mut keys: Vec<String> = (0..=0x7f_u8).map(|b| char::from(b).to_string()).collect();
    keys.extend(["é∑🔒".to_owned(), "a\"b\\c\u{1f}\u{7f}\n".to_owned()]);
    for key in keys {
        let written = encoded(page(&key)).len() - empty;
        assert_eq!(json_escaped_len(&key), written, "{key:?}");
    }
}

#[test]
fn a_page_that_ends_on_the_last_key_is_followed_by_an_empty_one() {
    let mut h = Harness::new();
    h.set_up("s", 10_000);
    h.insert("alice", "s", "a").unwrap();
    h.insert("alice", "s", "b").unwrap();
    let page = members(&mut h, "s", 0, 2);
    assert_eq!(page.members.len(), 2);
    assert_eq!(page.next, None, "nothing more after the last key");
}

#[test]
fn a_set_is_removed_whole_when_its_ttl_runs_out() {
    let mut h = Harness::new();
    h.set_up("s", 500);
    h.insert("alice", "s", "a").unwrap();
    h.advance(499);
    assert_eq!(
        inspect_set(&mut h, "s"),
        Ok(SetInfo {
            size: 1,
            remaining_ms: 1
        })
    );
    h.advance(1);
    assert_eq!(
        h.insert("alice", "s", "a").unwrap_err().code,
        ErrorCode::NoSuchSet
    );
    assert_eq!(h.shard.counters().sets.members, 0);
}

#[test]
fn tear_down_removes_the_set_and_reports_its_size() {
    let mut h = Harness::new();
    h.set_up("s", 500);
    h.insert("alice", "s", "a").unwrap();
    h.insert("alice", "s", "b").unwrap();
    assert_eq!(tear_down(&mut h, "s"), Ok(2));
    assert_eq!(tear_down(&mut h, "s"), Err(ErrorCode::NoSuchSet));
    assert_eq!(h.shard.counters().sets.members, 0);
    assert_eq!(h.shard.counters().sets.torn_down, 1);
}

#[test]
fn a_set_set_up_again_after_tear_down_starts_empty_and_keeps_its_own_ttl() {
    let mut h = Harness::new();
    h.set_up("s", 100);
    h.insert("alice", "s", "a").unwrap();
    tear_down(&mut h, "s").unwrap();
    assert_eq!(
        h.set_up("s", 1000),
        Okay::SetUp(SetUpReply {
            created: true,
            size: 0
        })
    );
    h.advance(100); // the old set's deadline must not touch the new one
    assert_eq!(h.insert("bob", "s", "a").unwrap(), inserted(1, true));
}

#[test]
fn inspect_set_reports_size_and_remaining_ttl() {
    let mut h = Harness::new();
    h.set_up("s", 1000);
    h.insert("alice", "s", "a").unwrap();
    h.advance(300);
    assert_eq!(
        inspect_set(&mut h, "s"),
        Ok(SetInfo {
            size: 1,
            remaining_ms: 700
        })
    );
}

#[test]
fn sets_beyond_the_limit_are_refused_as_overloaded() {
    let mut limits = Limits::unbounded_capacity();
    limits.sets_max = 1;
    let mut h = Harness::with_limits(limits);
    h.set_up("a", 100);
    let op = SetOp::SetUp {
        set: "b".into(),
        ttl_ms: 100,
    };
    assert_eq!(h.set_op("x", op).code(), ErrorCode::Overloaded);
    h.set_up("a", 100); // restarting an existing one is fine
}

#[test]
fn members_beyond_a_sets_limit_are_refused_but_duplicates_still_answer() {
    let mut limits = Limits::unbounded_capacity();
    limits.set_members_max = 2;
    let mut h = Harness::with_limits(limits);
    h.set_up("s", 1000);
    h.insert("alice", "s", "a").unwrap();
    h.insert("alice", "s", "b").unwrap();
    assert_eq!(
        h.insert("alice", "s", "c").unwrap_err().code,
        ErrorCode::Overloaded
    );
    assert_eq!(h.insert("bob", "s", "a").unwrap(), inserted(1, false));
}

#[test]
fn members_beyond_the_shard_limit_are_refused_and_a_batch_stops_there() {
    let mut limits = Limits::unbounded_capacity();
    limits.members_max = 3;
    let mut h = Harness::with_limits(limits);
    h.set_up("s", 1000);
    h.set_up("t", 1000);
    h.insert("alice", "s", "a").unwrap();
    let keys = Keys::Many(vec!["x".into(), "y".into(), "z".into()]);
    let op = SetOp::Insert {
        set: "t".into(),
        keys: keys.clone(),
    };
    assert_eq!(h.set_op("alice", op).code(), ErrorCode::Overloaded);
    // The keys before the limit stayed, and a retry answers them the same.
    assert_eq!(h.insert("alice", "t", "x").unwrap(), inserted(1, true));
    assert_eq!(h.insert("alice", "t", "y").unwrap(), inserted(2, true));
    tear_down(&mut h, "s").unwrap();
    let op = SetOp::Insert {
        set: "t".into(),
        keys,
    };
    assert!(matches!(h.set_op("alice", op).ok(), Okay::InsertedMany(_)));
}

#[test]
fn member_key_bytes_beyond_the_shard_budget_are_refused_until_a_set_goes() {
    let mut limits = Limits::unbounded_capacity();
    limits.member_bytes_max = 10;
    let mut h = Harness::with_limits(limits);
    h.set_up("s", 1000);
    h.insert("alice", "s", "12345").unwrap();
    h.insert("alice", "s", "6789").unwrap();
    assert_eq!(
        h.insert("alice", "s", "ab").unwrap_err().code,
        ErrorCode::Overloaded,
        "11 bytes would pass the budget of 10"
    );
    assert_eq!(h.insert("alice", "s", "a").unwrap(), inserted(3, true));
    assert_eq!(
        h.insert("bob", "s", "12345").unwrap(),
        inserted(1, false),
        "a known key costs nothing"
    );
    tear_down(&mut h, "s").unwrap();
    h.set_up("t", 1000);
    assert_eq!(
        h.insert("alice", "t", "0123456789").unwrap(),
        inserted(1, true)
    );
}

#[test]
fn many_members_keep_their_indexes_through_table_growth() {
    let mut h = Harness::new();
    h.set_up("s", 10_000);
    let keys: Vec<String> = (0..5000).map(|i| format!("key-{i}")).collect();
    let op = SetOp::Insert {
        set: "s".into(),
        keys: Keys::Many(keys.clone()),
    };
    h.set_op("alice", op).ok();
    for (i, key) in keys.iter().enumerate().step_by(97) {
        assert_eq!(
            h.insert("bob", "s", key).unwrap(),
            inserted(i as u64 + 1, false)
        );
    }
    h.check();
}
