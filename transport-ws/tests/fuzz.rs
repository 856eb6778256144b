//! The decoder and HTTP-head fuzz, a few thousand cases (the million-case
//! run is `cargo run --release -p deadbolt-transport-ws --example
//! deadbolt-fuzz`). See `fuzzing/mod.rs` for what each layer checks. A
//! failure prints the (shrunk) input.

mod fuzzing;

use fuzzing::{Rig, Tally, check_decode, count_panics, head, limits, message, panics, show};
use proptest::test_runner::{Config, TestCaseError, TestRunner};

fn runner(cases: u32) -> TestRunner {
    TestRunner::new(Config {
        cases,
        failure_persistence: None,
        ..Config::default()
    })
}

/// Fails the case if anything panicked since `before`.
fn no_new_panic(before: u64) -> Result<(), TestCaseError> {
    let (now, last) = panics();
    if now != before {
        return Err(TestCaseError::fail(format!("panicked: {last}")));
    }
    Ok(())
}

#[test]
fn the_decoder_answers_every_message_with_a_request_or_a_well_formed_refusal() {
    count_panics();
    let limits = limits();
    let tally = std::cell::RefCell::new(Tally::default());
    let result = runner(4000).run(&message(), |bytes| {
        let before = panics().0;
        let kind = std::panic::catch_unwind(|| check_decode(&bytes, &limits))
            .map_err(|_| TestCaseError::fail(format!("panicked on {}", show(&bytes))))?
            .map_err(|why| TestCaseError::fail(format!("{why}\ninput: {}", show(&bytes))))?;
        no_new_panic(before)?;
        tally.borrow_mut().add(kind);
        Ok(())
    });
    result.unwrap_or_else(|e| panic!("{e}"));
    let tally = tally.into_inner();
    // The strategies reach every verdict, not only refusals.
    for kind in ["bad_request", "too_large", "valid lock", "valid insert"] {
        assert!(
            tally.kinds.contains_key(kind),
            "no {kind} in {:?}",
            tally.kinds
        );
    }
}

/// The real server on a runtime of its own, for the async layers.
fn rig() -> (tokio::runtime::Runtime, Rig) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let rig = runtime.block_on(async { Rig::start() });
    (runtime, rig)
}

#[test]
fn the_server_answers_every_request_head_with_well_formed_http() {
    count_panics();
    let (runtime, rig) = rig();
    let tally = std::cell::RefCell::new(Tally::default());
    let result = runner(1500).run(&head(), |bytes| {
        let before = panics().0;
        let kind = runtime
            .block_on(rig.head(&bytes))
            .map_err(|why| TestCaseError::fail(format!("{why}\ninput: {}", show(&bytes))))?;
        no_new_panic(before)?;
        tally.borrow_mut().add(kind);
        Ok(())
    });
    result.unwrap_or_else(|e| panic!("{e}"));
    let tally = tally.into_inner();
    for kind in ["http 101", "http 400", "http 404", "http 426"] {
        assert!(
            tally.kinds.contains_key(kind),
            "no {kind} in {:?}",
            tally.kinds
        );
    }
}

#[test]
fn the_server_answers_every_frame_as_the_decoder_says() {
    count_panics();
    let (runtime, rig) = rig();
    let tally = std::cell::RefCell::new(Tally::default());
    let frames = (message(), proptest::prelude::any::<u8>());
    let result = runner(1500).run(&frames, |(bytes, kind)| {
        let before = panics().0;
        // One frame in sixteen binary.
        let text = kind % 16 != 0;
        let verdict = runtime
            .block_on(rig.frame(&bytes, text))
            .map_err(|why| TestCaseError::fail(format!("{why}\ninput: {}", show(&bytes))))?;
        no_new_panic(before)?;
        tally.borrow_mut().add(verdict);
        Ok(())
    });
    result.unwrap_or_else(|e| panic!("{e}"));
    let tally = tally.into_inner();
    for kind in ["bad_request", "close 1007", "close 1009", "valid, ok"] {
        assert!(
            tally.kinds.contains_key(kind),
            "no {kind} in {:?}",
            tally.kinds
        );
    }
}
