//! Publishes one message and waits for the broker's acknowledgement, with
//! options built in code: no environment involved.
//!
//! ```sh
//! cargo run -p propeller-mqtt --example publisher -- tcp://localhost:1883 demo/topic hello
//! ```

use std::time::Duration;

use propeller_mqtt::{Client, Options, QoS, Secret};

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let usage = "usage: publisher ADDRESS TOPIC MESSAGE";
    let (Some(address), Some(topic), Some(message)) = (args.next(), args.next(), args.next())
    else {
        return Err(usage.into());
    };
    let password = std::env::var("MQTT_PASSWORD").unwrap_or_default();
    let options = Options::new(&address, "publisher-example", Secret::new(password))?
        .with_qos(QoS::AtLeastOnce)
        .with_connect_timeout(Duration::from_secs(5));

    let (client, _messages) = Client::start(&options, Vec::new())?;
    // Returns once recorded; resolves once the broker has it, across reconnects.
    let delivery = client.publish(topic.as_str(), message).await?;
    match tokio::time::timeout(Duration::from_secs(30), delivery.acknowledged()).await {
        Ok(acknowledged) => acknowledged?,
        Err(_) => return Err(format!("{topic}: not acknowledged within 30 s").into()),
    }
    println!("published on {topic}");
    client.shutdown().await;
    Ok(())
}
