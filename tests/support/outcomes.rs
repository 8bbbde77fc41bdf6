//! A proplet's connection, in-process: the options its env gives, and the
//! first outcome of a client started with them (connected, or the failure
//! the client classified). The failure tests and the transport tests assert
//! on these.

use std::time::Duration;

use propeller_mqtt::{Client, ConnectionState, Failure, Options};
use propeller_protocol::{Service, ServiceConfig};

use crate::Env;

/// The connection options of a proplet with `env`.
pub fn proplet_options(env: &Env) -> Options {
    ServiceConfig::from_vars(Service::Proplet, env.vars.clone())
        .expect("valid config")
        .mqtt
}

/// Starts a client and returns its first outcome: `Ok(())` on CONNACK, or
/// the failure. The 20 s only guard against a hang.
pub async fn outcome(env: &Env) -> Result<(), Failure> {
    let (client, _messages) =
        Client::start(&proplet_options(env), vec![]).expect("the TLS material loads");
    let mut state = client.state();
    let result = tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            match &*state.borrow_and_update() {
                ConnectionState::Connected => return Ok(()),
                ConnectionState::Retrying { failure, .. } => return Err(failure.clone()),
                _ => {}
            }
            state.changed().await.expect("client alive");
        }
    })
    .await
    .expect("an outcome within 20 s");
    client.shutdown().await;
    result
}

/// The failure of a connection that must fail.
pub async fn fails(env: &Env) -> Failure {
    outcome(env).await.expect_err("the connection should fail")
}
