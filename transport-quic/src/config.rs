//! The QUIC frontend's limits, each configurable.

use std::time::Duration;

/// Limits of QUIC connections, for both ends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QuicConfig {
    /// Requests (streams) in flight at once on one connection; a client
    /// past it waits for a stream, which is QUIC's own back-pressure. As
    /// many as a WebSocket connection may have in flight (4096): a
    /// client whose waiting `lock`s are past it cannot even send the rest,
    /// so they are granted a round trip of stream credit late, in waves
    /// (the expiry storm's 3,125 waiters per connection, seconds late at
    /// 1024).
    pub streams_per_connection: u32,
    /// Streams a connection is first allowed; the server raises the
    /// allowance to `streams_per_connection` once the client has half of
    /// them in flight. quinn keeps an entry for every stream a peer may open, in
    /// the maps it looks up on every packet: allowing all 4096 at once
    /// made its stream bookkeeping a fifth of the server's CPU per
    /// request (docs/quic.md).
    pub initial_streams: u32,
    /// A connection with no traffic for this long is closed (its waiters
    /// and ephemeral locks are then released).
    pub idle_timeout: Duration,
    /// The client sends keep-alives this often, so that a long lock wait is
    /// not taken for idleness.
    pub keep_alive: Duration,
    /// Bytes a peer may send on one stream before it is read: one message.
    pub stream_receive_window: u32,
    /// Bytes a peer may send on one connection before it is read.
    pub receive_window: u32,
    /// Connection attempts queued before the server refuses more.
    pub max_incoming: usize,
    /// Most open connections; past it, new ones are refused.
    pub max_connections: usize,
    /// With more connections open than this, a client must first prove its
    /// address with a Retry round trip (a defence against spoofed floods).
    pub retry_above: usize,
    /// How long shutdown waits for connections to close cleanly.
    pub shutdown_grace: Duration,
    /// Loss recovery, acknowledgements and congestion control.
    pub tuning: QuicTuning,
}

impl Default for QuicConfig {
    fn default() -> Self {
        QuicConfig {
            streams_per_connection: 4096,
            initial_streams: 128,
            idle_timeout: Duration::from_secs(30),
            keep_alive: Duration::from_secs(5),
            stream_receive_window: (1 << 20) + (64 << 10),
            receive_window: 16 << 20,
            max_incoming: 1024,
            max_connections: 10_000,
            retry_above: 1_000,
            shutdown_grace: Duration::from_secs(5),
            tuning: QuicTuning::default(),
        }
    }
}

impl QuicConfig {
    /// Sets the server-side limits on `server`: transport parameters (the
    /// client first allowed [`QuicConfig::first_streams`]), the
    /// incoming-connection queue, no migration.
    pub fn apply_to_server(&self, server: &mut quinn::ServerConfig) {
        let mut transport = self.transport();
        transport.max_concurrent_bidi_streams(self.first_streams().into());
        server
            .transport_config(std::sync::Arc::new(transport))
            .max_incoming(self.max_incoming)
            .migration(false);
    }

    /// The streams a client may open at first: `initial_streams`, within
    /// `streams_per_connection`.
    pub fn first_streams(&self) -> u32 {
        self.initial_streams
            .clamp(1, self.streams_per_connection.max(1))
    }

    /// The transport parameters both ends use. The peer may open no
    /// stream: a server raises its clients' allowance in
    /// [`QuicConfig::apply_to_server`], and a server never opens one to a
    /// client.
    pub fn transport(&self) -> quinn::TransportConfig {
        let mut transport = quinn::TransportConfig::default();
        transport
            .max_concurrent_bidi_streams(0u32.into())
            .max_concurrent_uni_streams(0u32.into())
            .stream_receive_window(self.stream_receive_window.into())
            .receive_window(self.receive_window.into())
            .max_idle_timeout(quinn::IdleTimeout::try_from(self.idle_timeout).ok());
        self.tuning.apply(&mut transport);
        transport
    }
}

/// quinn's loss-recovery, acknowledgement and congestion settings, as
/// deadbolt sets them: chosen for small requests and replies rather than
/// bulk transfer (docs/quic.md says why, with the measurements).
///
/// Both ends apply the same tuning; a setting about the peer (the
/// acknowledgement delay asked of it) works only if the peer speaks the
/// QUIC acknowledgement-frequency extension, as quinn does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QuicTuning {
    /// The round-trip time assumed before the first sample.
    pub initial_rtt: Duration,
    /// The longest the peer may wait before acknowledging, asked of it
    /// with an ACK_FREQUENCY frame; `None` leaves the peer's own (quinn:
    /// 25 ms). A lost lone packet is detected by the probe timeout, which
    /// adds this delay: it dominates a sub-millisecond round trip.
    pub max_ack_delay: Option<Duration>,
    /// Ack-eliciting packets the peer may receive before it must
    /// acknowledge at once (with `max_ack_delay` set); quinn's default 1.
    pub ack_eliciting_threshold: u32,
    /// A packet is lost once this many later packets are acknowledged.
    pub packet_threshold: u32,
    /// ... or once this many thousandths of a round trip have passed since
    /// a later packet was acknowledged (quinn: 1125, RFC 9002's 9/8).
    pub time_threshold_permille: u32,
    /// The congestion controller.
    pub congestion: Congestion,
}

/// A congestion controller quinn provides.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Congestion {
    /// CUBIC (quinn's default).
    Cubic,
    /// NewReno.
    NewReno,
    /// BBR (quinn marks it experimental).
    Bbr,
}

impl QuicTuning {
    /// quinn's own defaults.
    pub fn quinn() -> QuicTuning {
        QuicTuning {
            initial_rtt: Duration::from_millis(333),
            max_ack_delay: None,
            ack_eliciting_threshold: 1,
            packet_threshold: 3,
            time_threshold_permille: 1125,
            congestion: Congestion::Cubic,
        }
    }

    /// Parses `quinn` or `rpc` (the default), either followed by
    /// comma-separated overrides: `initial_rtt=10ms`,
    /// `max_ack_delay=1ms` (or `off`), `ack_eliciting_threshold=0`,
    /// `packet_threshold=3`, `time_threshold=1125` (thousandths of a
    /// round trip), `congestion=cubic|new_reno|bbr`.
    pub fn parse(text: &str) -> Result<QuicTuning, String> {
        let mut parts = text.split(',').map(str::trim);
        let mut tuning = match parts.next() {
            Some("quinn") => QuicTuning::quinn(),
            Some("rpc") => QuicTuning::default(),
            other => return Err(format!("starts with quinn or rpc, not {other:?}")),
        };
        for part in parts {
            let (name, value) = part
                .split_once('=')
                .ok_or_else(|| format!("{part:?} is not name=value"))?;
            tuning.set(name, value)?;
        }
        Ok(tuning)
    }

    fn set(&mut self, name: &str, value: &str) -> Result<(), String> {
        let bad = |what: &str| format!("{name}={value}: {what}");
        let millis = |v: &str| -> Result<Duration, String> {
            let ms: f64 = v
                .trim_end_matches("ms")
                .parse()
                .map_err(|_| bad("a duration in ms"))?;
            if !(ms.is_finite() && ms >= 0.0) {
                return Err(bad("a duration in ms"));
            }
            Ok(Duration::from_secs_f64(ms / 1000.0))
        };
        let number = |v: &str| v.parse::<u32>().map_err(|_| bad("a whole number"));
        match name {
            "initial_rtt" => self.initial_rtt = millis(value)?,
            "max_ack_delay" if value == "off" => self.max_ack_delay = None,
            "max_ack_delay" => self.max_ack_delay = Some(millis(value)?),
            "ack_eliciting_threshold" => self.ack_eliciting_threshold = number(value)?,
            "packet_threshold" => self.packet_threshold = number(value)?.max(1),
            "time_threshold" => self.time_threshold_permille = number(value)?.max(1000),
            "congestion" => {
                self.congestion = match value {
                    "cubic" => Congestion::Cubic,
                    "new_reno" => Congestion::NewReno,
                    "bbr" => Congestion::Bbr,
                    _ => return Err(bad("cubic, new_reno or bbr")),
                }
            }
            _ => return Err(format!("no setting {name:?}")),
        }
        Ok(())
    }

    /// Sets these on `transport`.
    pub fn apply(&self, transport: &mut quinn::TransportConfig) {
        transport
            .initial_rtt(self.initial_rtt)
            .packet_threshold(self.packet_threshold)
            .time_threshold(self.time_threshold_permille as f32 / 1000.0);
        if let Some(delay) = self.max_ack_delay {
            let mut frequency = quinn::AckFrequencyConfig::default();
            frequency
                .max_ack_delay(Some(delay))
                .ack_eliciting_threshold(self.ack_eliciting_threshold.into())
                // RFC 9002's advice: one less than the packet threshold.
                .reordering_threshold(self.packet_threshold.saturating_sub(1).into());
            transport.ack_frequency_config(Some(frequency));
        }
        let factory: std::sync::Arc<dyn quinn::congestion::ControllerFactory + Send + Sync> =
            match self.congestion {
                Congestion::Cubic => std::sync::Arc::new(quinn::congestion::CubicConfig::default()),
                Congestion::NewReno => {
                    std::sync::Arc::new(quinn::congestion::NewRenoConfig::default())
                }
                Congestion::Bbr => std::sync::Arc::new(quinn::congestion::BbrConfig::default()),
            };
        transport.congestion_controller_factory(factory);
    }
}

impl Default for QuicTuning {
    /// deadbolt's choice, `rpc`: quinn's own but for a 1 ms acknowledgement
    /// delay asked of the peer, which brings a lost lone packet's probe
    /// timeout from over 25 ms to a few (docs/quic.md has the
    /// measurements, and the settings measured and left alone).
    fn default() -> QuicTuning {
        QuicTuning {
            max_ack_delay: Some(Duration::from_millis(1)),
            ..QuicTuning::quinn()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tuning_starts_from_a_preset_and_takes_overrides() {
        assert_eq!(QuicTuning::parse("rpc"), Ok(QuicTuning::default()));
        assert_eq!(QuicTuning::parse("quinn"), Ok(QuicTuning::quinn()));
        let tuned = QuicTuning::parse("quinn, max_ack_delay=2ms,congestion=bbr,packet_threshold=5")
            .expect("valid");
        assert_eq!(tuned.max_ack_delay, Some(Duration::from_millis(2)));
        assert_eq!(tuned.congestion, Congestion::Bbr);
        assert_eq!(tuned.packet_threshold, 5);
        let off = QuicTuning::parse("rpc,max_ack_delay=off").expect("valid");
        assert_eq!(off.max_ack_delay, None);
    }

    #[test]
    fn bad_tuning_is_refused_with_a_reason() {
        for (text, says) in [
            ("fast", "starts with quinn or rpc"),
            ("rpc,max_ack_delay", "is not name=value"),
            ("rpc,max_ack_delay=soon", "a duration in ms"),
            ("rpc,congestion=vegas", "cubic, new_reno or bbr"),
            ("rpc,window=3", "no setting"),
            ("rpc,initial_rtt=-1ms", "a duration in ms"),
        ] {
            let error = QuicTuning::parse(text).expect_err(text);
            assert!(error.contains(says), "{text}: {error}");
        }
    }
}
