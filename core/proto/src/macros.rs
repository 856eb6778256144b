//! The machinery that turns the two tables in [`ops`](super::ops) into code.
//! Nothing here names an op or a field.
//!
//! - `wire_fields!` turns the field table into the struct a request is
//!   read into on the decoder's fast path (`WireRequest`), the struct a
//!   client writes it from (`WireRequestOut`), and the JSON type of each
//!   field for the slow path's messages (`FIELD_TYPES`).
//! - `define_ops!` turns the op table into [`OpKind`](super::OpKind),
//!   [`Op::kind`](super::Op::kind), the decoder of each op's fields
//!   (`decode_op`), their encoder (`encode_op`), and the reader and check
//!   of each op's reply ([`OpKind::expects`](super::OpKind::expects)).

/// See the module docs; used once, in `ops.rs`.
macro_rules! wire_fields {
    (unknown_fields: ignore; $($fields:tt)*) => {
        $crate::macros::wire_fields!(@emit [] false; $($fields)*);
    };
    (unknown_fields: refuse; $($fields:tt)*) => {
        $crate::macros::wire_fields!(
            @emit [#[serde(deny_unknown_fields)]] true; $($fields)*
        );
    };
    (
        @emit [$($attr:tt)*] $refuse:literal;
        $( $(#[doc = $doc:literal])* $field:ident: $ty:ty ),* $(,)?
    ) => {
        /// Whether a field the op does not take is refused (`bad_request`
        /// naming it) rather than ignored.
        pub(super) const REFUSE_UNKNOWN_FIELDS: bool = $refuse;

        /// A request as the decoder's fast path reads it: every field any op
        /// may carry, typed, so that a well-formed message is read in one
        /// pass without an intermediate JSON value. An op's rules then take
        /// out the fields it needs.
        #[derive(serde::Deserialize)]
        $($attr)*
        pub(super) struct WireRequest {
            /// The request id.
            pub(super) id: $crate::RequestId,
            /// The op's name.
            pub(super) op: OpName,
            $( $(#[doc = $doc])* pub(super) $field: Option<$ty>, )*
        }

        impl WireRequest {
            /// The first field still present once the op's rules took
            /// theirs: one the op does not take.
            pub(super) fn leftover(&self) -> Option<&'static str> {
                $( if self.$field.is_some() { return Some(stringify!($field)); } )*
                None
            }
        }

        /// A request as a client writes it, borrowing from its [`Op`].
        #[derive(serde::Serialize)]
        pub(super) struct WireRequestOut<'a> {
            /// The request id.
            pub(super) id: $crate::RequestId,
            /// The op's name.
            pub(super) op: &'static str,
            $(
                #[serde(skip_serializing_if = "Option::is_none")]
                pub(super) $field:
                    Option<<$ty as $crate::wire::WireType>::Out<'a>>,
            )*
        }

        impl WireRequestOut<'_> {
            /// A request with no fields set yet.
            pub(super) fn new(id: $crate::RequestId, op: &'static str) -> Self {
                WireRequestOut { id, op, $( $field: None, )* }
            }
        }

        /// The JSON type of each field, for the decoder's slow path: in
        /// this order, the first mistyped field is the one reported.
        pub(super) const FIELD_TYPES: &[(&str, $crate::wire::FieldType)] = &[
            $( (stringify!($field), <$ty as $crate::wire::WireType>::JSON), )*
        ];
    };
}

/// See the module docs; used once, in `ops.rs`.
macro_rules! define_ops {
    (
        |$limits:ident|
        $(
            $(#[doc = $doc:literal])*
            $kind:ident = $name:literal -> $reply:ident {
                $(
                    $field:ident: $wire:tt => $rule:ident
                        $(( $($targs:tt)* ))? $({ $($sargs:tt)* })?
                ),* $(,)?
            } => { $($op:tt)+ }
            $( | $alt:ident -> $alt_reply:ident if { $($alt_op:tt)+ } )?
        )*
    ) => {
        /// Which operation a request is: what a client keeps to read the
        /// reply, and what metrics label requests with. One per op in the
        /// table, plus one for each other reply shape an op may have.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum OpKind {
            $(
                $(#[doc = $doc])*
                $kind,
                $(
                    #[doc = concat!(
                        "`", $name, "`, answered with [`", stringify!($alt_reply),
                        "`](super::Okay::", stringify!($alt_reply), ")."
                    )]
                    $alt,
                )?
            )*
        }

        /// The name of every op on the wire, in table order.
        pub const OP_NAMES: &[&str] = &[$($name),*];

        impl OpKind {
            /// Every kind, in table order.
            pub const ALL: &[OpKind] = &[$( OpKind::$kind, $( OpKind::$alt, )? )*];

            /// The op's name on the wire, which metrics use too.
            pub const fn wire_name(self) -> &'static str {
                match self {
                    $( OpKind::$kind => $name, $( OpKind::$alt => $name, )? )*
                }
            }

            /// Whether `okay` has the shape of a reply to this op.
            pub fn expects(self, okay: &$crate::Okay) -> bool {
                match self {
                    $(
                        OpKind::$kind => matches!(okay, $crate::Okay::$reply(_)),
                        $( OpKind::$alt => matches!(okay, $crate::Okay::$alt_reply(_)), )?
                    )*
                }
            }

            /// Reads the `ok` object of a reply to this op.
            pub(super) fn decode_okay(
                self,
                json: &str,
            ) -> Result<$crate::Okay, serde_json::Error> {
                Ok(match self {
                    $(
                        OpKind::$kind => $crate::Okay::$reply(serde_json::from_str(json)?),
                        $(
                            OpKind::$alt =>
                                $crate::Okay::$alt_reply(serde_json::from_str(json)?),
                        )?
                    )*
                })
            }
        }

        impl $crate::Op {
            /// Which operation this is.
            #[allow(unused_variables)] // the patterns bind every field
            pub fn kind(&self) -> OpKind {
                match self {
                    $( $( $($alt_op)+ => OpKind::$alt, )? $($op)+ => OpKind::$kind, )*
                }
            }

            /// The op's name on the wire.
            pub fn name(&self) -> &'static str {
                self.kind().wire_name()
            }
        }

        /// The `"op"` of a request, as the decoder's fast path reads it.
        #[derive(Debug, Clone, Copy, serde::Deserialize)]
        pub(super) enum OpName {
            $( #[serde(rename = $name)] $kind, )*
        }

        /// Builds the op that `w` names out of its fields, each read and
        /// checked by its rule (in table order, so the first bad field is
        /// the one reported).
        pub(super) fn decode_op(
            w: &mut WireRequest,
            $limits: &$crate::limits::Limits,
        ) -> Result<$crate::Op, $crate::ServerError> {
            let op = match w.op {
                $(
                    OpName::$kind => {
                        $(
                            let $field = $crate::rules::Rule::decode(
                                $rule $(( $($targs)* ))? $({ $($sargs)* })?,
                                $crate::macros::slot!(w, $wire),
                            )?;
                        )*
                        $($op)+
                    }
                )*
            };
            if REFUSE_UNKNOWN_FIELDS {
                if let Some(field) = w.leftover() {
                    return Err($crate::ServerError::bad_request(format!(
                        "op `{}` takes no field `{field}`",
                        op.name()
                    )));
                }
            }
            Ok(op)
        }

        /// Writes the fields of `op` into the request that carries it.
        pub(super) fn encode_op<'a>(op: &'a $crate::Op, out: &mut WireRequestOut<'a>) {
            match op {
                $(
                    $($op)+ => {
                        $(
                            $crate::macros::put!(
                                out,
                                $wire,
                                <$rule as $crate::rules::Rule>::encode($field)
                            );
                        )*
                    }
                )*
            }
        }
    };
}

/// The [`Slot`](super::rules::Slot) (or tuple of slots) a rule reads,
/// taken out of the request.
macro_rules! slot {
    ($w:ident, $field:ident) => {
        $crate::rules::Slot {
            name: stringify!($field),
            value: $w.$field.take(),
        }
    };
    ($w:ident, ($($field:ident),+)) => {
        ($( $crate::macros::slot!($w, $field) ),+)
    };
}

/// Stores what a rule wrote into the field (or tuple of fields) it names.
macro_rules! put {
    ($out:ident, $field:ident, $value:expr) => {
        $out.$field = $value;
    };
    ($out:ident, ($($field:ident),+), $value:expr) => {
        ($( $out.$field ),+) = $value;
    };
}

pub(crate) use {define_ops, put, slot, wire_fields};
