//! The browser client (`web/deadbolt.js`) is written by hand, not generated
//! from the op table of `deadbolt_core::proto::ops`. These tests keep the
//! two from drifting apart: the ops the JavaScript sends must be exactly the
//! ops the Rust definition knows, by name.

use std::collections::BTreeSet;

use deadbolt_core::proto::OP_NAMES;

/// The browser client, read at build time. Its path is given only here.
const DEADBOLT_JS: &str = include_str!("../web/deadbolt.js");

/// The op names a JavaScript source sends: the string after each `op: "`
/// (a request object) and each `call("` (`Client.call(op, fields)`).
fn ops_sent_by(js: &str) -> BTreeSet<&str> {
    let mut ops = BTreeSet::new();
    for marker in [r#"op: ""#, r#"call(""#] {
        for (at, _) in js.match_indices(marker) {
            let rest = &js[at + marker.len()..];
            if let Some(end) = rest.find('"') {
                ops.insert(&rest[..end]);
            }
        }
    }
    ops
}

#[test]
fn the_browser_client_sends_exactly_the_ops_of_the_rust_definition() {
    let js = ops_sent_by(DEADBOLT_JS);
    let rust: BTreeSet<&str> = OP_NAMES.iter().copied().collect();
    let unknown: Vec<_> = js.difference(&rust).collect();
    let never_sent: Vec<_> = rust.difference(&js).collect();
    assert!(
        unknown.is_empty(),
        "deadbolt.js sends ops that the op table (core/proto/src/ops.rs) does not define: {unknown:?}"
    );
    assert!(
        never_sent.is_empty(),
        "deadbolt.js never sends these ops of the op table (core/proto/src/ops.rs): {never_sent:?}"
    );
}

#[test]
fn the_scan_finds_both_ways_the_client_sends_an_op() {
    let js = r#"
        connection.request(this.#nextId++, { op: "hello", client: this.clientId }, max);
        await this.call("ping");
        return this.#client.call("set_up", { set: this.name });
        /** Sends any request, `{op, ...fields}`. */
        async call(op, fields = {}) {}
    "#;
    assert_eq!(ops_sent_by(js), BTreeSet::from(["hello", "ping", "set_up"]));
}
