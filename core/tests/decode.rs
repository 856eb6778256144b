//! SPEC sections 4 and 5: decoding, validation and bad input.

use deadbolt_core::Limits;
use deadbolt_core::proto::{
    Acquire, ErrorCode, Keys, LockOp, Mode, Okay, Op, OpKind, Reply, Request, ServerError, SetOp,
    Wait, decode_reply, decode_request, encode_reply, encode_request,
};
use proptest::prelude::*;

fn decode(json: &str) -> Result<Request, (Option<u64>, ErrorCode, String)> {
    decode_request(json.as_bytes(), &Limits::default())
        .map_err(|e| (e.id, e.error.code, e.error.message.into_owned()))
}

fn bad(json: &str) -> (Option<u64>, String) {
    match decode(json) {
        Ok(request) => panic!("{json} decoded as {request:?}"),
        Err((id, code, message)) => {
            assert_eq!(code, ErrorCode::BadRequest, "{json}: {message}");
            (id, message)
        }
    }
}

#[test]
fn a_valid_lock_request_decodes_with_every_field() {
    let request = decode(
        r#"{"id":17,"op":"lock","key":"job/42","ttl_ms":30000,"wait_ms":5000,"ephemeral":true}"#,
    )
    .unwrap();
    let expected = Op::Lock(LockOp::Acquire(Acquire {
        key: "job/42".into(),
        ttl_ms: 30000,
        wait: Wait::UpTo(5000),
        ephemeral: true,
        mode: Mode::MUTEX,
        lock_delay_ms: 0,
        notify: false,
    }));
    assert_eq!(
        request,
        Request {
            id: 17,
            op: expected
        }
    );
}

#[test]
fn mode_limit_and_lock_delay_decode_with_their_defaults_and_bounds() {
    let acquire = |extra: &str| match decode(&format!(
        r#"{{"id":1,"op":"lock","key":"k","ttl_ms":1{extra}}}"#
    )) {
        Ok(Request {
            op: Op::Lock(LockOp::Acquire(a)),
            ..
        }) => Ok((a.mode, a.lock_delay_ms)),
        Ok(other) => panic!("{other:?}"),
        Err((_, code, message)) => Err((code, message)),
    };
    assert_eq!(acquire(""), Ok((Mode::MUTEX, 0)));
    assert_eq!(acquire(r#","mode":"shared""#), Ok((Mode::Shared, 0)));
    assert_eq!(
        acquire(r#","mode":"shared","limit":1"#),
        Ok((Mode::Shared, 0))
    );
    assert_eq!(
        acquire(r#","mode":"exclusive","limit":10000,"lock_delay_ms":60000"#),
        Ok((Mode::Exclusive { limit: 10_000 }, 60_000))
    );
    for (extra, field) in [
        (r#","limit":0"#, "limit"),
        (r#","limit":10001"#, "limit"),
        (r#","mode":"shared","limit":5"#, "limit"),
        (r#","mode":"reader""#, "mode"),
        (r#","mode":1"#, "mode"),
        (r#","lock_delay_ms":60001"#, "lock_delay_ms"),
    ] {
        let (code, message) = acquire(extra).unwrap_err();
        assert_eq!(code, ErrorCode::BadRequest, "{extra}");
        assert!(
            message.contains(&format!("`{field}`")),
            "{extra}: {message}"
        );
    }
    // Defaults are left out when a client writes them.
    let plain = Request {
        id: 1,
        op: Op::Lock(LockOp::Acquire(Acquire::mutex("k", 5, Wait::Forever))),
    };
    assert_eq!(
        encode_request(&plain),
        r#"{"id":1,"op":"lock","key":"k","ttl_ms":5}"#
    );
}

#[test]
fn wait_ms_absent_zero_and_positive_mean_forever_never_and_bounded() {
    let wait = |extra: &str| match decode(&format!(
        r#"{{"id":1,"op":"lock","key":"k","ttl_ms":1{extra}}}"#
    ))
    .unwrap()
    .op
    {
        Op::Lock(LockOp::Acquire(a)) => a.wait,
        other => panic!("{other:?}"),
    };
    assert_eq!(wait(""), Wait::Forever);
    assert_eq!(wait(r#","wait_ms":null"#), Wait::Forever);
    assert_eq!(wait(r#","wait_ms":0"#), Wait::Never);
    assert_eq!(wait(r#","wait_ms":7"#), Wait::UpTo(7));
}

#[test]
fn input_that_is_not_json_gets_bad_request_with_a_null_id() {
    for input in [
        "",
        "{",
        "nope",
        "{\"id\":1,",
        "[1,2",
        "\u{0}",
        "{\"id\":1}}",
    ] {
        assert_eq!(bad(input).0, None, "{input:?}");
    }
}

#[test]
fn truncated_messages_get_bad_request() {
    let full = r#"{"id":5,"op":"insert","set":"s","keys":["a","b"]}"#;
    for cut in 0..full.len() {
        let (id, _) = bad(&full[..cut]);
        assert_eq!(id, None, "truncated at {cut}");
    }
}

#[test]
fn json_that_is_not_an_object_gets_bad_request_with_a_null_id() {
    for input in ["1", "\"lock\"", "[]", "null", "true"] {
        let (id, message) = bad(input);
        assert_eq!(id, None);
        assert!(message.contains("object"), "{message}");
    }
}

#[test]
fn a_missing_or_unreadable_id_gets_a_null_id() {
    for input in [
        r#"{"op":"ping"}"#,
        r#"{"id":"7","op":"ping"}"#,
        r#"{"id":-1,"op":"ping"}"#,
        r#"{"id":1.5,"op":"ping"}"#,
        r#"{"id":null,"op":"ping"}"#,
        r#"{"id":18446744073709551616,"op":"ping"}"#,
    ] {
        assert_eq!(bad(input).0, None, "{input}");
    }
}

#[test]
fn an_unknown_op_gets_bad_request_carrying_the_id() {
    let (id, message) = bad(r#"{"id":9,"op":"lock_all_the_things"}"#);
    assert_eq!(id, Some(9));
    assert!(message.contains("unknown op"), "{message}");
    let (id, message) = bad(r#"{"id":9}"#);
    assert_eq!(id, Some(9));
    assert!(message.contains("op"), "{message}");
    assert_eq!(bad(r#"{"id":9,"op":7}"#).0, Some(9));
}

#[test]
fn a_missing_field_gets_bad_request_naming_it_and_carrying_the_id() {
    for (input, field) in [
        (r#"{"id":3,"op":"lock","ttl_ms":5}"#, "key"),
        (r#"{"id":3,"op":"lock","key":"k"}"#, "ttl_ms"),
        (r#"{"id":3,"op":"unlock","key":"k"}"#, "token"),
        (r#"{"id":3,"op":"extend","key":"k","token":1}"#, "ttl_ms"),
        (r#"{"id":3,"op":"set_up","set":"s"}"#, "ttl_ms"),
        (r#"{"id":3,"op":"insert","set":"s"}"#, "key"),
        (r#"{"id":3,"op":"members"}"#, "set"),
        (r#"{"id":3,"op":"cancel"}"#, "target"),
        (r#"{"id":3,"op":"hello"}"#, "client"),
    ] {
        let (id, message) = bad(input);
        assert_eq!(id, Some(3), "{input}");
        assert!(message.contains(field), "{input}: {message}");
    }
}

#[test]
fn a_mistyped_field_gets_bad_request_naming_it_and_carrying_the_id() {
    for (input, field) in [
        (r#"{"id":4,"op":"lock","key":1,"ttl_ms":5}"#, "key"),
        (r#"{"id":4,"op":"lock","key":"k","ttl_ms":"5"}"#, "ttl_ms"),
        (r#"{"id":4,"op":"lock","key":"k","ttl_ms":-5}"#, "ttl_ms"),
        (r#"{"id":4,"op":"lock","key":"k","ttl_ms":5.5}"#, "ttl_ms"),
        (
            r#"{"id":4,"op":"lock","key":"k","ttl_ms":5,"ephemeral":"yes"}"#,
            "ephemeral",
        ),
        (r#"{"id":4,"op":"insert","set":"s","keys":"a"}"#, "keys"),
        (r#"{"id":4,"op":"insert","set":"s","keys":["a",1]}"#, "keys"),
        (r#"{"id":4,"op":"unlock","key":"k","token":true}"#, "token"),
        (r#"{"id":4,"op":"members","set":{"a":1}}"#, "set"),
    ] {
        let (id, message) = bad(input);
        assert_eq!(id, Some(4), "{input}");
        assert!(message.contains(field), "{input}: {message}");
    }
}

#[test]
fn out_of_bounds_values_get_bad_request_carrying_the_id() {
    let long_key = "k".repeat(1025);
    let long_client = "c".repeat(65);
    for input in [
        r#"{"id":6,"op":"lock","key":"k","ttl_ms":0}"#.to_owned(),
        r#"{"id":6,"op":"lock","key":"k","ttl_ms":86400001}"#.to_owned(),
        r#"{"id":6,"op":"lock","key":"k","ttl_ms":5,"wait_ms":86400001}"#.to_owned(),
        r#"{"id":6,"op":"lock","key":"","ttl_ms":5}"#.to_owned(),
        format!(r#"{{"id":6,"op":"lock","key":"{long_key}","ttl_ms":5}}"#),
        r#"{"id":6,"op":"set_up","set":"","ttl_ms":5}"#.to_owned(),
        r#"{"id":6,"op":"insert","set":"s","keys":["a",""]}"#.to_owned(),
        r#"{"id":6,"op":"insert","set":"s","key":"a","keys":["b"]}"#.to_owned(),
        r#"{"id":6,"op":"members","set":"s","limit":0}"#.to_owned(),
        r#"{"id":6,"op":"members","set":"s","limit":10001}"#.to_owned(),
        r#"{"id":6,"op":"hello","client":""}"#.to_owned(),
        format!(r#"{{"id":6,"op":"hello","client":"{long_client}"}}"#),
    ] {
        assert_eq!(bad(&input).0, Some(6), "{input}");
    }
}

#[test]
fn bounds_at_their_limits_are_accepted() {
    let key = "k".repeat(1024);
    decode(&format!(
        r#"{{"id":1,"op":"lock","key":"{key}","ttl_ms":86400000,"wait_ms":86400000}}"#
    ))
    .unwrap();
    decode(r#"{"id":1,"op":"lock","key":"k","ttl_ms":1}"#).unwrap();
    decode(r#"{"id":1,"op":"members","set":"s","limit":10000}"#).unwrap();
    decode(&format!(
        r#"{{"id":1,"op":"hello","client":"{}"}}"#,
        "c".repeat(64)
    ))
    .unwrap();
}

#[test]
fn key_length_counts_utf8_bytes_not_characters() {
    let key = "é".repeat(512); // 1024 bytes
    decode(&format!(r#"{{"id":1,"op":"inspect","key":"{key}"}}"#)).unwrap();
    let key = "é".repeat(513);
    bad(&format!(r#"{{"id":1,"op":"inspect","key":"{key}"}}"#));
}

#[test]
fn escaped_strings_decode_and_lone_surrogates_are_refused() {
    let request = decode(r#"{"id":1,"op":"inspect","key":"a\"b\u00e9\n"}"#).unwrap();
    assert_eq!(
        request.op,
        Op::Lock(LockOp::Inspect {
            key: "a\"b\u{e9}\n".into()
        })
    );
    bad(r#"{"id":1,"op":"inspect","key":"\ud800"}"#);
}

#[test]
fn unknown_fields_get_bad_request_naming_them() {
    // A misspelt `ephemeral` would otherwise grant a lock that outlives
    // its connection.
    let (id, message) = bad(r#"{"id":4,"op":"lock","key":"k","ttl_ms":5,"ephemral":true}"#);
    assert_eq!(id, Some(4));
    assert!(message.contains("`ephemral`"), "{message}");
    let (_, message) = bad(r#"{"id":1,"op":"ping","trace":{"deep":[1,2,3]}}"#);
    assert!(message.contains("`trace`"), "{message}");
    // A field some other op takes is refused too, named.
    let (id, message) = bad(r#"{"id":2,"op":"unlock","key":"k","token":3,"ttl_ms":5}"#);
    assert_eq!(id, Some(2));
    assert_eq!(message, "op `unlock` takes no field `ttl_ms`");
    // `null` says "absent", for any known field.
    decode(r#"{"id":1,"op":"ping","key":null}"#).unwrap();
    decode(r#"{"id":1,"op":"lock","key":"k","ttl_ms":5,"wait_ms":null}"#).unwrap();
}

#[test]
fn duplicate_fields_are_refused() {
    let (id, _) = bad(r#"{"id":1,"op":"lock","key":"a","key":"b","ttl_ms":5}"#);
    assert_eq!(id, Some(1));
}

#[test]
fn deeply_nested_input_is_refused_without_overflowing_the_stack() {
    let nest = |n: usize| format!("{}{}", "[".repeat(n), "]".repeat(n));
    // In an unknown field it is skipped without recursion, and the field
    // named.
    let unknown = format!(r#"{{"id":1,"op":"ping","x":{}}}"#, nest(100_000));
    let (id, message) = bad(&unknown);
    assert_eq!((id, message.as_str()), (Some(1), "unknown field `x`"));
    // Where a value is read, it is refused, with the id.
    let mistyped = format!(r#"{{"id":1,"op":"inspect","key":{}}}"#, nest(100_000));
    assert!(matches!(
        decode(&mistyped),
        Err((Some(1), ErrorCode::BadRequest, _))
    ));
    let unclosed = "[".repeat(1_000_000);
    assert!(matches!(
        decode(&unclosed),
        Err((None, ErrorCode::BadRequest, _))
    ));
}

#[test]
fn a_message_over_the_size_limit_gets_too_large_without_being_parsed() {
    let limits = Limits {
        message_bytes_max: 64,
        ..Limits::default()
    };
    let message = format!(r#"{{"id":1,"op":"inspect","key":"{}"}}"#, "k".repeat(100));
    let error = decode_request(message.as_bytes(), &limits).unwrap_err();
    assert_eq!((error.id, error.error.code), (None, ErrorCode::TooLarge));
    let reply = encode_reply(&error.into_reply());
    assert!(
        reply.starts_with(r#"{"id":null,"err":{"code":"too_large""#),
        "{reply}"
    );
}

#[test]
fn a_batch_over_the_key_limit_gets_too_large_carrying_the_id() {
    let limits = Limits {
        insert_batch_max: 3,
        ..Limits::default()
    };
    let message = r#"{"id":8,"op":"insert","set":"s","keys":["a","b","c","d"]}"#;
    let error = decode_request(message.as_bytes(), &limits).unwrap_err();
    assert_eq!((error.id, error.error.code), (Some(8), ErrorCode::TooLarge));
}

#[test]
fn replies_encode_as_the_spec_shows() {
    let granted = Reply {
        id: Some(17),
        outcome: Ok(Okay::Granted(deadbolt_core::proto::Granted::new(5, 30000))),
    };
    assert_eq!(
        encode_reply(&granted),
        r#"{"id":17,"ok":{"token":5,"ttl_ms":30000}}"#
    );
    let empty = Reply {
        id: Some(1),
        outcome: Ok(Okay::EMPTY),
    };
    assert_eq!(encode_reply(&empty), r#"{"id":1,"ok":{}}"#);
    let busy = Reply {
        id: Some(2),
        outcome: Err(ServerError::busy()),
    };
    assert!(encode_reply(&busy).starts_with(r#"{"id":2,"err":{"code":"busy","message":""#));
    let free = Reply {
        id: Some(3),
        outcome: Ok(Okay::LockInfo(deadbolt_core::proto::LockInfo::free())),
    };
    assert_eq!(
        encode_reply(&free),
        r#"{"id":3,"ok":{"holder":null,"waiters":0,"holders":[],"limit":1}}"#
    );
}

fn arb_key() -> impl Strategy<Value = String> {
    "[a-z0-9/é\"\\\\]{1,12}"
}

fn arb_op() -> impl Strategy<Value = Op> {
    let wait = prop_oneof![
        Just(Wait::Forever),
        Just(Wait::Never),
        (1u64..86_400_000).prop_map(Wait::UpTo)
    ];
    let mode = prop_oneof![
        Just(Mode::Shared),
        (1u32..=10_000).prop_map(|limit| Mode::Exclusive { limit })
    ];
    prop_oneof![
        ("[a-f0-9]{1,64}", proptest::option::of("[ -~]{1,64}")).prop_map(|(client, auth)| {
            Op::Hello {
                client,
                auth: auth.map(deadbolt_core::proto::Secret::new),
            }
        }),
        Just(Op::Ping),
        any::<u64>().prop_map(|target| Op::Cancel { target }),
        (
            arb_key(),
            1u64..=86_400_000,
            wait,
            any::<bool>(),
            mode,
            0u64..=60_000
        )
            .prop_map(|(key, ttl_ms, wait, ephemeral, mode, lock_delay_ms)| {
                Op::Lock(LockOp::Acquire(Acquire {
                    key,
                    ttl_ms,
                    wait,
                    ephemeral,
                    mode,
                    lock_delay_ms,
                    notify: false,
                }))
            }),
        (arb_key(), any::<u64>()).prop_map(|(key, token)| Op::Lock(LockOp::Release { key, token })),
        (arb_key(), any::<u64>(), 1u64..=86_400_000)
            .prop_map(|(key, token, ttl_ms)| Op::Lock(LockOp::Extend { key, token, ttl_ms })),
        arb_key().prop_map(|key| Op::Lock(LockOp::Inspect { key })),
        (arb_key(), 1u64..=86_400_000)
            .prop_map(|(set, ttl_ms)| Op::Set(SetOp::SetUp { set, ttl_ms })),
        (arb_key(), arb_key()).prop_map(|(set, key)| Op::Set(SetOp::Insert {
            set,
            keys: Keys::One(key)
        })),
        (arb_key(), prop::collection::vec(arb_key(), 0..5)).prop_map(|(set, keys)| Op::Set(
            SetOp::Insert {
                set,
                keys: Keys::Many(keys)
            }
        )),
        (arb_key(), any::<u64>(), 1u32..=10_000)
            .prop_map(|(set, after, limit)| Op::Set(SetOp::Members { set, after, limit })),
        arb_key().prop_map(|set| Op::Set(SetOp::Inspect { set })),
        arb_key().prop_map(|set| Op::Set(SetOp::TearDown { set })),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn decoding_never_panics_on_any_bytes(bytes in prop::collection::vec(any::<u8>(), 0..256)) {
        let _ = decode_request(&bytes, &Limits::default());
        let _ = decode_reply(&bytes);
    }

    #[test]
    fn decoding_never_panics_on_near_valid_json(
        id in prop_oneof![Just("1".to_owned()), any::<i64>().prop_map(|i| i.to_string()), Just("\"x\"".to_owned())],
        op in "(lock|unlock|extend|inspect|set_up|insert|members|inspect_set|tear_down|hello|ping|cancel|zap)",
        field in "(key|keys|set|ttl_ms|wait_ms|token|target|after|limit|client|ephemeral|mode|lock_delay_ms)",
        value in prop_oneof![Just("null".to_owned()), Just("\"\"".to_owned()), Just("[]".to_owned()),
                             Just("{}".to_owned()), Just("true".to_owned()), any::<i64>().prop_map(|i| i.to_string()),
                             "\"[ -~]{0,8}\"", Just("1e400".to_owned())],
    ) {
        let json = format!(r#"{{"id":{id},"op":"{op}","{field}":{value}}}"#);
        if let Err(e) = decode_request(json.as_bytes(), &Limits::default()) {
            prop_assert!(matches!(e.error.code, ErrorCode::BadRequest | ErrorCode::TooLarge));
        }
    }

    #[test]
    fn every_request_survives_an_encode_decode_round_trip(id in any::<u64>(), op in arb_op()) {
        let request = Request { id, op };
        let decoded = decode_request(encode_request(&request).as_bytes(), &Limits::default());
        prop_assert_eq!(decoded, Ok(request));
    }

    #[test]
    fn replies_survive_an_encode_decode_round_trip(id in any::<u64>(), token in any::<u64>(), ttl_ms in any::<u64>()) {
        let reply = Reply { id: Some(id), outcome: Ok(Okay::Granted(deadbolt_core::proto::Granted::new(token, ttl_ms))) };
        let raw = decode_reply(encode_reply(&reply).as_bytes()).unwrap();
        prop_assert_eq!(raw.id, Some(id));
        prop_assert_eq!(raw.into_outcome(OpKind::Lock).unwrap(), reply.outcome);
    }
}
