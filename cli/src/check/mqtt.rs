//! Step 6: MQTT CONNECT and CONNACK, written out by hand so that every answer,
//! or the lack of one, can be reported.

use std::time::Instant;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::{ms, Checker, Stop};
use propeller_mqtt::Failure;
use propeller_protocol::ServiceConfig;

pub(super) async fn connect<S: AsyncRead + AsyncWrite + Unpin>(
    c: &mut Checker,
    config: &ServiceConfig,
    mut stream: S,
) -> Result<(), Stop> {
    let packet = connect_packet(
        &config.mqtt.client_id,
        config.mqtt.client_key.expose(),
        config.mqtt.keep_alive.as_secs() as u16,
    );
    let started = Instant::now();
    // One write: Magistrala's edge parses CONNECT from the first chunk it sees.
    if let Err(e) = write(&mut stream, &packet).await {
        let failure =
            Failure::from_io(&e, config.mqtt.mode()).unwrap_or(Failure::ClosedBeforeConnAck);
        return Err(c.failure("mqtt", &failure));
    }
    let mut connack = [0u8; 4];
    let read =
        tokio::time::timeout(config.mqtt.connect_timeout, stream.read_exact(&mut connack)).await;
    let failure = match read {
        Err(_) => Failure::Timeout,
        Ok(Err(e)) => {
            Failure::from_io(&e, config.mqtt.mode()).unwrap_or(Failure::ClosedBeforeConnAck)
        }
        Ok(Ok(_)) if connack[..2] != [0x20, 0x02] => Failure::Refused(format!(
            "the broker answered CONNECT with bytes {connack:02x?}, not a CONNACK"
        )),
        Ok(Ok(_)) => match connack[3] {
            0 => {
                c.ok(
                    "mqtt",
                    format!("CONNACK: connection accepted, in {}", ms(started)),
                );
                let _ = write(&mut stream, &[0xe0, 0x00]).await; // DISCONNECT
                let _ = stream.shutdown().await;
                return Ok(());
            }
            4 | 5 => Failure::NotAuthorized,
            1 => Failure::Refused(
                "unacceptable protocol version (the broker wants another MQTT version)".into(),
            ),
            2 => Failure::Refused("client identifier rejected".into()),
            3 => Failure::Refused("server unavailable".into()),
            code => Failure::Refused(format!("return code {code}")),
        },
    };
    Err(c.failure("mqtt", &failure))
}

async fn write<S: AsyncWrite + Unpin>(stream: &mut S, bytes: &[u8]) -> std::io::Result<()> {
    stream.write_all(bytes).await?;
    stream.flush().await
}

/// An MQTT 3.1.1 CONNECT with clean session, username and password.
fn connect_packet(client_id: &str, password: &str, keep_alive: u16) -> Vec<u8> {
    let mut body = vec![0x00, 0x04, b'M', b'Q', b'T', b'T', 0x04, 0xc2];
    body.extend_from_slice(&keep_alive.to_be_bytes());
    for field in [client_id, client_id, password] {
        body.extend_from_slice(&(field.len() as u16).to_be_bytes());
        body.extend_from_slice(field.as_bytes());
    }
    let mut packet = vec![0x10];
    let mut remaining = body.len();
    loop {
        let mut byte = (remaining % 128) as u8;
        remaining /= 128;
        if remaining > 0 {
            byte |= 0x80;
        }
        packet.push(byte);
        if remaining == 0 {
            break;
        }
    }
    packet.extend(body);
    packet
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connect_packet_layout() {
        let packet = connect_packet("id", "pw", 30);
        assert_eq!(packet[0], 0x10);
        assert_eq!(packet[1] as usize, packet.len() - 2);
        assert_eq!(
            &packet[2..12],
            &[0, 4, b'M', b'Q', b'T', b'T', 4, 0xc2, 0, 30]
        );
        assert_eq!(
            &packet[12..],
            &[0, 2, b'i', b'd', 0, 2, b'i', b'd', 0, 2, b'p', b'w']
        );
        // Long fields need a two-byte remaining length.
        let long = connect_packet("id", &"x".repeat(200), 30);
        assert_eq!(long[1] & 0x80, 0x80);
    }
}
