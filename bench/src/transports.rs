//! Which transport each simulated device speaks (`--transport` of `load` and `drill`): one
//! of the edge's three for every device, or a mix of all three.

use clap::ValueEnum;
use gapless_client::Transport;

/// The transports of a run's devices.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum TransportMix {
    /// Every device over the WebSocket.
    Ws,
    /// Every device over Server-Sent Events.
    Sse,
    /// Every device over long-polling.
    Poll,
    /// Device `i` over WebSocket, SSE and long-polling by `i % 3`.
    Mixed,
}

impl TransportMix {
    /// The transport of device `i`.
    pub fn of_device(self, i: usize) -> Transport {
        match self {
            TransportMix::Ws => Transport::WebSocket,
            TransportMix::Sse => Transport::Sse,
            TransportMix::Poll => Transport::Poll,
            TransportMix::Mixed => Transport::ALL[i % Transport::ALL.len()],
        }
    }

    /// The flag's value (`ws`, `sse`, `poll`, `mixed`), to hand on to a worker process.
    pub fn arg(self) -> &'static str {
        match self {
            TransportMix::Ws => "ws",
            TransportMix::Sse => "sse",
            TransportMix::Poll => "poll",
            TransportMix::Mixed => "mixed",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_mix_cycles_through_the_transports_and_args_parse_back() {
        let mixed: Vec<Transport> = (0..6).map(|i| TransportMix::Mixed.of_device(i)).collect();
        assert_eq!(
            mixed,
            [Transport::ALL, Transport::ALL].concat(),
            "device i speaks transport i % 3"
        );
        for mix in TransportMix::value_variants() {
            assert_eq!(TransportMix::from_str(mix.arg(), false), Ok(*mix));
        }
    }
}
