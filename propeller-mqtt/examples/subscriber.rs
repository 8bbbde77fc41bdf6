//! Prints every message on a topic filter until Ctrl-C, then disconnects.
//! The subscription is restored after every reconnect.
//!
//! ```sh
//! cargo run -p propeller-mqtt --example subscriber -- tcp://localhost:1883 'demo/#'
//! ```

use propeller_mqtt::{Client, Options, Secret};

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let (Some(address), Some(filter)) = (args.next(), args.next()) else {
        return Err("usage: subscriber ADDRESS TOPIC_FILTER".into());
    };
    let password = std::env::var("MQTT_PASSWORD").unwrap_or_default();
    let options = Options::new(&address, "subscriber-example", Secret::new(password))?;
    let (client, mut messages) = Client::start(&options, vec![filter])?;

    tokio::spawn(async move {
        while let Some(message) = messages.recv().await {
            let text = String::from_utf8_lossy(&message.payload);
            println!("{}: {text}", message.topic);
        }
    });
    // The process owns the signal; the client only needs to know when to stop.
    client.run_until(tokio::signal::ctrl_c()).await;
    Ok(())
}
