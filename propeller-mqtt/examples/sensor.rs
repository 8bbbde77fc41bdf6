//! A service of your own on propeller-mqtt: it reads `SENSOR_*` variables,
//! connects in whichever mode they describe (plain, MQTTS or mTLS), and
//! publishes `SENSOR_READINGS` readings on `SENSOR_TOPIC`, each acknowledged.
//!
//! ```sh
//! SENSOR_MQTT_ADDRESS=tcp://localhost:1883 SENSOR_CLIENT_ID=sensor-7 \
//! SENSOR_CLIENT_KEY=secret SENSOR_TOPIC=sensors/7 cargo run -p propeller-mqtt --example sensor
//! ```

use propeller_mqtt::env::EnvConfig;
use propeller_mqtt::{Client, ConnectionState};

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    // Our own variables are declared, so only typos are reported as unknown.
    let config = EnvConfig::from_env("SENSOR_", &["TOPIC", "READINGS"])?;
    for variable in &config.unknown {
        eprintln!("sensor: {variable} is not a variable the sensor reads (ignored)");
    }
    let settings = &config.settings;
    let topic = settings.required("TOPIC", "name the topic to publish readings on")?;
    let readings = settings.parse("READINGS", 10u32, |text| {
        text.parse()
            .map_err(|_| "write a number of readings, such as 10".to_owned())
    })?;

    let (client, _messages) = Client::start(&config.options, Vec::new())?;
    let mut state = client.state();
    loop {
        match &*state.borrow_and_update() {
            ConnectionState::Connected => break,
            ConnectionState::Retrying { failure, .. } => eprintln!(
                "sensor: {failure}; fix: {}",
                failure.fix(&config.options.names)
            ),
            _ => {}
        }
        state.changed().await?;
    }
    println!("sensor: connected, mode={}", config.options.mode());

    for reading in 0..readings {
        let delivery = client
            .publish(topic, format!("{{\"reading\":{reading}}}"))
            .await?;
        delivery.acknowledged().await?;
    }
    println!("sensor: {readings} readings acknowledged");
    client.shutdown().await;
    Ok(())
}
