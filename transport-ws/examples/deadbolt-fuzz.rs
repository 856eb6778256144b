//! The long fuzz run: a million or more messages through the request
//! decoder, and request heads and WebSocket frames through the real
//! server, with the same strategies and checks as `tests/fuzz.rs` (see
//! `tests/fuzzing/mod.rs`). Prints cases per second and the replies by
//! kind; exits 1 with the input on the first failure or panic.
//!
//! ```sh
//! cargo run --release -p deadbolt-transport-ws --example deadbolt-fuzz -- \
//!     [--decoder 1000000] [--heads 1000000] [--frames 200000] [--seed 1]
//! ```

#[path = "../tests/fuzzing/mod.rs"]
mod fuzzing;

use std::process::ExitCode;
use std::time::Instant;

use fuzzing::{Rig, Tally, check_decode, count_panics, head, limits, message, panics, show};
use proptest::strategy::{Strategy, ValueTree};
use proptest::test_runner::{Config, RngAlgorithm, TestRng, TestRunner};

/// How many cases of each layer, and the seed.
struct Plan {
    decoder: u64,
    heads: u64,
    frames: u64,
    seed: u64,
}

fn plan() -> Result<Plan, String> {
    let mut plan = Plan {
        decoder: 1_000_000,
        heads: 1_000_000,
        frames: 200_000,
        seed: 1,
    };
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let value = args.next().ok_or(format!("{flag} needs a number"))?;
        let number: u64 = value
            .replace('_', "")
            .parse()
            .map_err(|_| format!("{flag} {value}: not a number"))?;
        match flag.as_str() {
            "--decoder" => plan.decoder = number,
            "--heads" => plan.heads = number,
            "--frames" => plan.frames = number,
            "--seed" => plan.seed = number,
            _ => {
                return Err(format!(
                    "unknown flag {flag} (--decoder, --heads, --frames, --seed)"
                ));
            }
        }
    }
    Ok(plan)
}

/// A runner whose cases follow from `seed` alone.
fn runner(seed: u64) -> TestRunner {
    let mut bytes = [0u8; 32];
    bytes[..8].copy_from_slice(&seed.to_le_bytes());
    let rng = TestRng::from_seed(RngAlgorithm::ChaCha, &bytes);
    TestRunner::new_with_rng(Config::default(), rng)
}

/// Runs `cases` cases of `strategy` through `check`; the tally, or the
/// failing input and why.
fn layer<S>(
    name: &str,
    cases: u64,
    seed: u64,
    strategy: S,
    mut check: impl FnMut(&S::Value) -> Result<String, String>,
) -> Result<(), String>
where
    S: Strategy,
    S::Value: AsRef<[u8]>,
{
    let mut runner = runner(seed);
    let mut tally = Tally::default();
    let started = Instant::now();
    for _ in 0..cases {
        let input = strategy
            .new_tree(&mut runner)
            .map_err(|e| e.to_string())?
            .current();
        let before = panics().0;
        let verdict = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| check(&input)))
            .unwrap_or_else(|_| Err("panicked".to_owned()));
        let (after, last) = panics();
        let verdict = if after != before {
            Err(format!("panicked: {last}"))
        } else {
            verdict
        };
        match verdict {
            Ok(kind) => tally.add(kind),
            Err(why) => {
                return Err(format!(
                    "{name}: case {} (seed {seed}): {why}\ninput: {}",
                    tally.cases + 1,
                    show(input.as_ref())
                ));
            }
        }
    }
    report(name, &tally, started.elapsed().as_secs_f64());
    Ok(())
}

fn report(name: &str, tally: &Tally, seconds: f64) {
    println!(
        "{name}: {} cases in {seconds:.1} s, {:.0} cases/s, 0 panics, 0 failures",
        tally.cases,
        tally.cases as f64 / seconds.max(1e-9)
    );
    for (kind, count) in &tally.kinds {
        println!("  {kind:<24} {count:>10}");
    }
}

fn run(plan: &Plan) -> Result<(), String> {
    count_panics();
    let limits = limits();
    layer("decoder", plan.decoder, plan.seed, message(), |bytes| {
        check_decode(bytes, &limits)
    })?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    let rig = runtime.block_on(async { Rig::start() });
    layer("head", plan.heads, plan.seed, head(), |bytes| {
        runtime.block_on(rig.head(bytes))
    })?;
    let frames = (message(), proptest::prelude::any::<u8>()).prop_map(|(bytes, kind)| Frame {
        bytes,
        text: kind % 16 != 0,
    });
    layer("frame", plan.frames, plan.seed, frames, |frame| {
        runtime.block_on(rig.frame(&frame.bytes, frame.text))
    })
}

/// One WebSocket frame's payload, and whether it is a text frame.
#[derive(Debug, Clone)]
struct Frame {
    bytes: Vec<u8>,
    text: bool,
}

impl AsRef<[u8]> for Frame {
    fn as_ref(&self) -> &[u8] {
        &self.bytes
    }
}

fn main() -> ExitCode {
    let plan = match plan() {
        Ok(plan) => plan,
        Err(why) => {
            eprintln!("deadbolt-fuzz: {why}");
            return ExitCode::from(2);
        }
    };
    let total = plan.decoder + plan.heads + plan.frames;
    println!(
        "deadbolt-fuzz: seed {}, {} decoder + {} head + {} frame cases ({total} in all), messages up to {} bytes",
        plan.seed,
        plan.decoder,
        plan.heads,
        plan.frames,
        limits().message_bytes_max
    );
    match run(&plan) {
        Ok(()) => ExitCode::SUCCESS,
        Err(why) => {
            eprintln!("deadbolt-fuzz: FAILED: {why}");
            ExitCode::FAILURE
        }
    }
}
