//! A TCP relay between a client and a broker that can go silent without
//! closing anything: a half-open link, as when a NAT forgets a connection or a
//! cable is pulled.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

pub struct Relay {
    pub port: u16,
    state: Arc<State>,
}

struct State {
    /// Connections accepted so far; each knows its number.
    accepted: AtomicU64,
    /// Connections numbered up to this one forward nothing any more.
    frozen_up_to: AtomicU64,
    stopped: AtomicBool,
}

impl Relay {
    /// Relays 127.0.0.1:`port` to 127.0.0.1:`upstream`.
    pub fn start(upstream: u16) -> Relay {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind the relay");
        let port = listener.local_addr().unwrap().port();
        let state = Arc::new(State {
            accepted: AtomicU64::new(0),
            frozen_up_to: AtomicU64::new(0),
            stopped: AtomicBool::new(false),
        });
        let accept_state = state.clone();
        std::thread::spawn(move || {
            for client in listener.incoming() {
                if accept_state.stopped.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(client) = client else { continue };
                let Ok(server) = TcpStream::connect(("127.0.0.1", upstream)) else {
                    continue;
                };
                let number = accept_state.accepted.fetch_add(1, Ordering::SeqCst) + 1;
                for (from, to) in [
                    (client.try_clone().unwrap(), server.try_clone().unwrap()),
                    (server, client),
                ] {
                    let state = accept_state.clone();
                    std::thread::spawn(move || pump(from, to, number, &state));
                }
            }
        });
        Relay { port, state }
    }

    /// Every connection open now stops forwarding, in both directions, and
    /// stays open. New connections work.
    pub fn freeze_open_connections(&self) {
        let accepted = self.state.accepted.load(Ordering::SeqCst);
        self.state.frozen_up_to.store(accepted, Ordering::SeqCst);
    }
}

fn pump(mut from: TcpStream, mut to: TcpStream, number: u64, state: &State) {
    let _ = from.set_read_timeout(Some(Duration::from_millis(50)));
    let mut buffer = [0u8; 16 * 1024];
    while !state.stopped.load(Ordering::SeqCst) {
        if number <= state.frozen_up_to.load(Ordering::SeqCst) {
            // Silent, not closed: hold both sockets and read nothing.
            std::thread::sleep(Duration::from_millis(50));
            continue;
        }
        match from.read(&mut buffer) {
            Ok(0) => break,
            Ok(n) => {
                if to.write_all(&buffer[..n]).is_err() {
                    break;
                }
            }
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(_) => break,
        }
    }
    let _ = to.shutdown(Shutdown::Both);
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.state.stopped.store(true, Ordering::SeqCst);
        // Wake the accept loop so that it sees the flag.
        let _ = TcpStream::connect(("127.0.0.1", self.port));
    }
}
