//! A publisher whose messages outlive it: it reads `DURABLE_*` variables,
//! keeps its outbox on disk (`DURABLE_MQTT_OUTBOX_DIR`), publishes
//! `DURABLE_COUNT` numbered messages on `DURABLE_TOPIC` without waiting for
//! the broker, then waits until the broker has acknowledged every message,
//! those a killed predecessor left in the directory included, and exits.
//!
//! ```sh
//! DURABLE_MQTT_ADDRESS=tcp://localhost:1883 DURABLE_CLIENT_ID=durable-1 \
//! DURABLE_CLIENT_KEY=secret DURABLE_MQTT_QOS=1 DURABLE_MQTT_OUTBOX_DIR=/tmp/durable \
//! DURABLE_TOPIC=numbers DURABLE_COUNT=1000 cargo run -p propeller-mqtt --example durable
//! ```
//!
//! Kill it (`kill -9`) once it says `published`, with the broker down, and
//! run it again with `DURABLE_COUNT=0`: the messages go out after the first
//! CONNACK. A configuration error, such as a directory another process
//! uses, exits with status 78 and one line, as the services do.

use std::process::ExitCode;
use std::time::Duration;

use propeller_mqtt::env::EnvConfig;
use propeller_mqtt::{one_line, Client, ConfigError, ConnectionState};

enum Stop {
    Config(ConfigError),
    Failed(Box<dyn std::error::Error>),
}

impl From<ConfigError> for Stop {
    fn from(error: ConfigError) -> Self {
        Stop::Config(error)
    }
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    match run().await {
        Ok(()) => ExitCode::SUCCESS,
        Err(Stop::Config(error)) => {
            eprintln!("durable: configuration error: {}", one_line(&error));
            ExitCode::from(78)
        }
        Err(Stop::Failed(error)) => {
            eprintln!("durable: {}", one_line(&*error));
            ExitCode::FAILURE
        }
    }
}

async fn run() -> Result<(), Stop> {
    let config = EnvConfig::from_env("DURABLE_", &["TOPIC", "COUNT", "FIRST"])?;
    for variable in &config.unknown {
        eprintln!("durable: {variable} is not a variable this example reads (ignored)");
    }
    let settings = &config.settings;
    let topic = settings.required("TOPIC", "name the topic to publish on")?;
    let number = |text: &str| {
        text.parse::<u64>()
            .map_err(|_| "write a whole number, such as 1000".to_owned())
    };
    let count = settings.parse("COUNT", 0, number)?;
    let first = settings.parse("FIRST", 0, number)?;

    let (client, _messages) = Client::start(&config.options, Vec::new())?;
    println!(
        "durable: started with {} messages from the outbox directory",
        client.unacknowledged().await
    );
    // Every connection, for whoever reads this output.
    let mut state = client.state();
    tokio::spawn(async move {
        loop {
            if *state.borrow_and_update() == ConnectionState::Connected {
                println!("durable: connected");
            }
            if state.changed().await.is_err() {
                return;
            }
        }
    });

    for number in first..first.saturating_add(count) {
        // Durable once `publish` returns; the acknowledgement is not awaited.
        let delivery = client
            .publish(topic, number.to_string())
            .await
            .map_err(|e| Stop::Failed(e.into()))?;
        drop(delivery);
    }
    println!("durable: published {count}");

    let drained = async {
        while client.unacknowledged().await > 0 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    tokio::select! {
        _ = drained => println!("durable: all acknowledged"),
        _ = tokio::signal::ctrl_c() => {}
    }
    let left = client.shutdown().await;
    if left > 0 {
        println!("durable: {left} messages left in the outbox directory for the next start");
    }
    Ok(())
}
