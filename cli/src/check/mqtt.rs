//! Step 6: MQTT CONNECT and CONNACK, one packet each way through
//! rumqttc's own codec, so that every answer, or the lack of one, can be
//! reported.

use std::time::Instant;

use bytes::BytesMut;
use rumqttc::mqttbytes::{
    self,
    v4::{Connect, ConnectReturnCode, Packet},
};
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
    )
    .map_err(|e| c.fail("mqtt", format!("cannot encode CONNECT: {e}"), None))?;
    let started = Instant::now();
    // One write: Magistrala's edge parses CONNECT from the first chunk it sees.
    if let Err(e) = write(&mut stream, &packet).await {
        let failure = Failure::from_io(&e, config.mqtt.mode())
            .unwrap_or(Failure::closed_before_connack(config.mqtt.mode()));
        return Err(c.failure("mqtt", &failure));
    }
    let read = tokio::time::timeout(config.mqtt.connect_timeout, read_packet(&mut stream)).await;
    let failure = match read {
        Err(_) => Failure::Timeout,
        Ok(Err(Answer::Io(e))) => Failure::from_io(&e, config.mqtt.mode())
            .unwrap_or(Failure::closed_before_connack(config.mqtt.mode())),
        Ok(Err(Answer::Closed)) => Failure::closed_before_connack(config.mqtt.mode()),
        Ok(Err(Answer::NotMqtt(e))) => Failure::Refused(format!(
            "the broker answered CONNECT with something that is not MQTT ({e:?})"
        )),
        Ok(Ok(Packet::ConnAck(connack))) => match connack.code {
            ConnectReturnCode::Success => {
                c.ok(
                    "mqtt",
                    format!("CONNACK: connection accepted, in {}", ms(started)),
                );
                let _ = write(&mut stream, &[0xe0, 0x00]).await; // DISCONNECT
                let _ = stream.shutdown().await;
                return Ok(());
            }
            ConnectReturnCode::NotAuthorized | ConnectReturnCode::BadUserNamePassword => {
                Failure::NotAuthorized
            }
            ConnectReturnCode::RefusedProtocolVersion => Failure::Refused(
                "unacceptable protocol version (the broker wants another MQTT version)".into(),
            ),
            ConnectReturnCode::BadClientId => Failure::Refused("client identifier rejected".into()),
            ConnectReturnCode::ServiceUnavailable => Failure::Refused("server unavailable".into()),
        },
        Ok(Ok(other)) => Failure::Refused(format!(
            "the broker answered CONNECT with {other:?}, not a CONNACK"
        )),
    };
    Err(c.failure("mqtt", &failure))
}

async fn write<S: AsyncWrite + Unpin>(stream: &mut S, bytes: &[u8]) -> std::io::Result<()> {
    stream.write_all(bytes).await?;
    stream.flush().await
}

/// An MQTT 3.1.1 CONNECT with clean session, and the client id as the
/// username, as the services send it.
fn connect_packet(
    client_id: &str,
    password: &str,
    keep_alive: u16,
) -> Result<BytesMut, mqttbytes::Error> {
    let mut connect = Connect::new(client_id);
    connect.keep_alive = keep_alive;
    connect.clean_session = true;
    connect.set_login(client_id, password);
    let mut packet = BytesMut::new();
    connect.write(&mut packet)?;
    Ok(packet)
}

/// Why no packet came back.
enum Answer {
    Io(std::io::Error),
    Closed,
    NotMqtt(mqttbytes::Error),
}

/// The broker's first packet. A CONNACK is 4 bytes; anything much longer
/// is not an answer to CONNECT.
async fn read_packet<S: AsyncRead + Unpin>(stream: &mut S) -> Result<Packet, Answer> {
    const MAX_ANSWER: usize = 1024;
    let mut buffer = BytesMut::with_capacity(64);
    loop {
        match Packet::read(&mut buffer, MAX_ANSWER) {
            Ok(packet) => return Ok(packet),
            Err(mqttbytes::Error::InsufficientBytes(_)) => {}
            Err(e) => return Err(Answer::NotMqtt(e)),
        }
        match stream.read_buf(&mut buffer).await {
            Ok(0) => return Err(Answer::Closed),
            Ok(_) => {}
            Err(e) => return Err(Answer::Io(e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What we send decodes as the CONNECT we meant, with mqttbytes' own reader.
    #[test]
    fn connect_packet_round_trips() {
        let long = "x".repeat(200);
        for password in ["pw", long.as_str()] {
            let mut packet = connect_packet("id", password, 30).unwrap();
            let size = packet.len();
            let Packet::Connect(connect) = Packet::read(&mut packet, size).unwrap() else {
                panic!("not a CONNECT");
            };
            assert_eq!((connect.client_id.as_str(), connect.keep_alive), ("id", 30));
            assert!(connect.clean_session);
            let login = connect.login.unwrap();
            assert_eq!(
                (login.username.as_str(), login.password.as_str()),
                ("id", password)
            );
        }
    }

    #[tokio::test]
    async fn answers_are_read_whole_or_named() {
        let (mut ours, mut theirs) = tokio::io::duplex(64);
        theirs.write_all(&[0x20, 0x02, 0x00]).await.unwrap();
        theirs.write_all(&[0x05]).await.unwrap();
        let Ok(Packet::ConnAck(connack)) = read_packet(&mut ours).await else {
            panic!("a CONNACK in two pieces is one CONNACK");
        };
        assert_eq!(connack.code, ConnectReturnCode::NotAuthorized);
        drop(theirs);
        assert!(matches!(read_packet(&mut ours).await, Err(Answer::Closed)));
    }
}
