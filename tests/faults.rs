//! Fault tolerance against a real mosquitto: broker kills, certificate
//! rotation, a half-open link, failover, and a broker that is down at start.
//! Every figure the issue asks for is printed (run with `--nocapture`).

use std::collections::HashMap;
use std::io::Write;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use propeller_mqtt::{Client, ClientError, ConnectionState};
use propeller_protocol::{Service, ServiceConfig};
use propeller_tests::{
    accounts, client_id, publish_once, servers_available, BrokerOptions, Env, Identity, Mosquitto,
    Pki, Relay, ServiceProcess, CHANNEL_TOPICS, CONNECTED, START,
};
use rumqttc::{AsyncClient, Event, Incoming, MqttOptions, QoS};
use tokio::time::timeout;

const TOPIC: &str = "m/dom/c/chan/numbers";
const MESSAGES: usize = 20_000;

/// A persistent-session subscriber (plain rumqttc, clean_session = false) that
/// records every number it receives, reconnecting as needed.
struct Subscriber {
    received: Arc<Mutex<HashMap<u32, u32>>>,
    stop: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

impl Subscriber {
    async fn start(port: u16, username: String, password: String) -> Subscriber {
        let mut options = MqttOptions::new("numbers-subscriber", "127.0.0.1", port);
        options
            .set_credentials(username, password)
            .set_clean_session(false)
            .set_keep_alive(Duration::from_secs(5))
            // Acknowledge only what was recorded: a message lost anywhere in
            // this harness before that is sent again by the broker, so a loss
            // the test reports is the publisher's or the broker's.
            .set_manual_acks(true);
        let (client, mut events) = AsyncClient::new(options, 100);
        client.subscribe(TOPIC, QoS::AtLeastOnce).await.unwrap();
        let received = Arc::new(Mutex::new(HashMap::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (subscribed_tx, subscribed_rx) = tokio::sync::oneshot::channel();
        let mut subscribed_tx = Some(subscribed_tx);
        let (task_received, task_stop) = (received.clone(), stop.clone());
        let task = tokio::spawn(async move {
            while !task_stop.load(Ordering::SeqCst) {
                match timeout(Duration::from_millis(200), events.poll()).await {
                    Ok(Ok(Event::Incoming(Incoming::Publish(publish)))) => {
                        let number: u32 = std::str::from_utf8(&publish.payload)
                            .unwrap()
                            .parse()
                            .unwrap();
                        *task_received.lock().unwrap().entry(number).or_insert(0) += 1;
                        let _ = client.try_ack(&publish);
                    }
                    Ok(Ok(Event::Incoming(Incoming::SubAck(_)))) => {
                        if let Some(tx) = subscribed_tx.take() {
                            let _ = tx.send(());
                        }
                    }
                    Ok(Err(_)) => tokio::time::sleep(Duration::from_millis(100)).await,
                    _ => {}
                }
            }
        });
        timeout(Duration::from_secs(10), subscribed_rx)
            .await
            .expect("subscribed")
            .unwrap();
        Subscriber {
            received,
            stop,
            task,
        }
    }

    fn distinct(&self) -> usize {
        self.received.lock().unwrap().len()
    }

    async fn finish(self) -> HashMap<u32, u32> {
        self.stop.store(true, Ordering::SeqCst);
        let _ = self.task.await;
        Arc::try_unwrap(self.received)
            .unwrap()
            .into_inner()
            .unwrap()
    }
}

async fn no_message_lost_across_broker_kills(mtls: bool) {
    let pki = Pki::shared();
    let (publisher, subscriber) = (pki.identity("proplet"), pki.identity("manager"));
    let broker = Mosquitto::start_with(
        pki,
        &accounts(&[&publisher, &subscriber], CHANNEL_TOPICS),
        BrokerOptions {
            persistence: true,
            ..Default::default()
        },
    );
    let subscriber = Subscriber::start(
        broker.plain,
        client_id("manager"),
        subscriber.secret.clone(),
    )
    .await;

    let mut env = Env::new("PROPLET", &publisher);
    match mtls {
        true => env.mtls(broker.mtls, pki, &publisher),
        false => env.plain(broker.plain),
    };
    env.set("MQTT_QOS", "1");
    let config = ServiceConfig::from_vars(Service::Proplet, env.vars.clone()).unwrap();
    let (client, _) = Client::start(&config.mqtt, vec![]).unwrap();

    // Every connection of the publisher, counted as it happens, and each
    // state seen, with when, for a failure message.
    let connections = Arc::new(AtomicUsize::new(0));
    let states = Arc::new(Mutex::new(Vec::new()));
    let mut state = client.state();
    let (counted, seen_states, since) = (connections.clone(), states.clone(), Instant::now());
    tokio::spawn(async move {
        loop {
            let now = state.borrow_and_update().clone();
            seen_states
                .lock()
                .unwrap()
                .push(format!("{:?} {now:?}", since.elapsed()));
            if now == ConnectionState::Connected {
                counted.fetch_add(1, Ordering::SeqCst);
            }
            if state.changed().await.is_err() {
                return;
            }
        }
    });

    // A killer thread: SIGKILL the broker twice while we publish, 1 s down
    // each time, once it has acknowledged a quarter, then three fifths, of
    // the messages: counting publishes would not do, as the outbox takes
    // 10,000 before the first connection. For each kill it records when it
    // landed, and the highest number the subscriber had recorded once the
    // broker was dead.
    // If this test panics before the kills (a publish fails), the flag set
    // as it unwinds ends the killer thread, which drops, and so stops, the
    // broker, rather than waiting for the end of the test process.
    let started = Instant::now();
    let published = Arc::new(AtomicUsize::new(0));
    let killer_published = published.clone();
    let acknowledged = Arc::new(AtomicUsize::new(0));
    let killer_acknowledged = acknowledged.clone();
    let abandoned = SetOnDrop(Arc::new(AtomicBool::new(false)));
    let killer_abandoned = abandoned.0.clone();
    let seen = subscriber.received.clone();
    let killer = std::thread::spawn(move || {
        let mut broker = broker;
        let highest = || seen.lock().unwrap().keys().max().copied();
        let mut kills = Vec::new();
        for at in [MESSAGES / 4, MESSAGES * 3 / 5] {
            while killer_acknowledged.load(Ordering::SeqCst) < at {
                if killer_abandoned.load(Ordering::SeqCst) {
                    return (broker, kills);
                }
                std::thread::sleep(Duration::from_millis(2));
            }
            // Taken once the broker is dead (`kill` waits for it): a PUBACK
            // that arrived before this was sent by the broker before it died.
            broker.kill();
            let killed_at = started.elapsed();
            // What was already in the subscriber's socket is recorded now.
            std::thread::sleep(Duration::from_millis(200));
            kills.push(Kill {
                at: killed_at,
                restarted: Duration::MAX,
                published: killer_published.load(Ordering::SeqCst),
                acknowledged: killer_acknowledged.load(Ordering::SeqCst),
                highest_seen: highest(),
            });
            std::thread::sleep(Duration::from_millis(800));
            // Any PUBACK taken in before this came from the dead broker, sent
            // before it died (ours may read it from the socket a little later).
            kills.last_mut().unwrap().restarted = started.elapsed();
            broker.start_again();
        }
        (broker, kills)
    });

    let mut full_waits = 0u32;
    // When the broker acknowledged each number, as time since `started`.
    let acked: Arc<Vec<Mutex<Option<Duration>>>> =
        Arc::new((0..MESSAGES).map(|_| Mutex::new(None)).collect());
    let mut watchers = Vec::with_capacity(MESSAGES);
    for number in 0..MESSAGES {
        let full_since = Instant::now();
        let delivery = loop {
            match client.publish(TOPIC, number.to_string()).await {
                Ok(delivery) => break delivery,
                // Backpressure: the outbox is full while the broker is down.
                Err(ClientError::OutboxFull { .. }) => {
                    full_waits += 1;
                    // A guard against a hang (a broker that did not come
                    // back), not a measure.
                    assert!(
                        full_since.elapsed() < Duration::from_secs(60),
                        "publish {number}: the outbox stayed full for 60 s"
                    );
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                Err(e) => panic!("publish {number}: {e}"),
            }
        };
        let (acked, acknowledged) = (acked.clone(), acknowledged.clone());
        watchers.push(tokio::spawn(async move {
            let outcome = delivery.acknowledged().await;
            *acked[number].lock().unwrap() = Some(started.elapsed());
            acknowledged.fetch_add(1, Ordering::SeqCst);
            outcome
        }));
        published.store(number + 1, Ordering::SeqCst);
        if number % 500 == 0 {
            // Let the kills land while messages are in flight.
            tokio::task::yield_now().await;
        }
    }
    // A guard against a hang, not a measure. The broker acknowledges in
    // order, so waiting for each in turn, 60 s without the next one means
    // none is coming. Each message may take far longer from its publish:
    // the outbox holds 10,000, and a persistent mosquitto under load has
    // acknowledged as few as 120 a second (84 s for the last of them).
    for (number, watcher) in watchers.into_iter().enumerate() {
        timeout(Duration::from_secs(60), watcher)
            .await
            .unwrap_or_else(|_| panic!("{number} not acknowledged within 60 s of the one before"))
            .unwrap()
            .unwrap();
    }
    let acknowledged_after = started.elapsed();
    let (broker, kills) = tokio::task::spawn_blocking(move || killer.join().unwrap())
        .await
        .unwrap();
    // The reconnects happened before the last acknowledgements; the task
    // that counts them may not have run yet. Wait for it (the deadline only
    // guards against a hang); asserted below.
    let deadline = Instant::now() + Duration::from_secs(30);
    while connections.load(Ordering::SeqCst) < kills.len() + 1 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    let deadline = Instant::now() + Duration::from_secs(60);
    while subscriber.distinct() < MESSAGES && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let received = subscriber.finish().await;
    client.shutdown().await;
    drop(broker);

    // The faults happened: two kills, and a connection after each.
    assert_eq!(kills.len(), 2, "{kills:?}");
    let connected = connections.load(Ordering::SeqCst);
    assert!(
        connected >= 3,
        "{connected} connections for 2 kills: {kills:?}; the publisher's states: {:?}",
        states.lock().unwrap()
    );

    let missing: Vec<u32> = (0..MESSAGES as u32)
        .filter(|n| !received.contains_key(n))
        .collect();
    let duplicates: u32 = received.values().map(|count| count - 1).sum();
    println!(
        "broker kills ({}): {MESSAGES} published, all acknowledged after {acknowledged_after:?}, \
         {} received, {duplicates} duplicates, {} missing, {full_waits} waits on a full outbox, \
         {connected} connections",
        if mtls { "mTLS" } else { "plain" },
        received.len(),
        missing.len()
    );
    // mosquitto 2.0 loses, now and then, the message it had in flight *to the
    // subscriber* when it was killed: the lost number was always the highest
    // the subscriber had seen at a kill, plus one, even with the subscriber
    // acknowledging only what it recorded. Such a loss is forgiven only when
    // the broker had acknowledged that message to our publisher before the
    // kill (so the client under test had handed it over), and only within the
    // broker's window of messages in flight to the subscriber at that kill:
    // mosquitto sends at most `max_inflight_messages` (20) unacknowledged
    // QoS 1 messages to a client, in order, after the highest it recorded.
    let broker_lost = |n: &u32| {
        let acked_at = *acked[*n as usize].lock().unwrap();
        kills.iter().any(|kill| {
            let next = kill.highest_seen.map_or(0, |seen| seen + 1);
            acked_at.is_some_and(|at| at < kill.restarted)
                && (next..next + MOSQUITTO_IN_FLIGHT).contains(n)
        })
    };
    let (forgiven, unexplained): (Vec<u32>, Vec<u32>) =
        missing.iter().partition(|n| broker_lost(n));
    if !forgiven.is_empty() {
        // To the process's stderr, which the harness does not capture, so
        // that CI's log shows every loss forgiven.
        let acked_at: Vec<Option<Duration>> = forgiven
            .iter()
            .map(|n| *acked[*n as usize].lock().unwrap())
            .collect();
        let _ = writeln!(
            std::io::stderr(),
            "forgiven: mosquitto lost {forgiven:?}, acknowledged to the publisher before a kill and in flight to the subscriber at it; acknowledged at {acked_at:?}; kills: {kills:?}"
        );
    }
    let detail: Vec<(u32, Option<Duration>)> = unexplained
        .iter()
        .take(10)
        .map(|n| (*n, *acked[*n as usize].lock().unwrap()))
        .collect();
    assert!(
        unexplained.is_empty(),
        "{} messages lost; the first (number, acknowledged at): {detail:?}; kills: {kills:?}; \
         {connected} connections; {} received, {duplicates} duplicates",
        unexplained.len(),
        received.len(),
    );
}

/// Sets its flag when dropped, on a panic too.
struct SetOnDrop(Arc<AtomicBool>);

impl Drop for SetOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::SeqCst);
    }
}

/// One SIGKILL of the broker.
#[derive(Debug)]
#[allow(dead_code)] // Read through Debug in failure messages.
struct Kill {
    /// Since the test started, once the broker was dead.
    at: Duration,
    /// Since the test started, as the broker was started again: every
    /// acknowledgement recorded before this came from the killed broker.
    restarted: Duration,
    /// How many numbers were published by then.
    published: usize,
    /// How many the broker had acknowledged by then.
    acknowledged: usize,
    /// The highest number the subscriber had recorded when the broker died.
    highest_seen: Option<u32>,
}

/// mosquitto's default `max_inflight_messages`: the QoS 1 messages it sends
/// a client before waiting for its acknowledgements.
const MOSQUITTO_IN_FLIGHT: u32 = 20;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_message_lost_across_broker_kills_plain() {
    if servers_available("no_message_lost_across_broker_kills_plain") {
        no_message_lost_across_broker_kills(false).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_message_lost_across_broker_kills_mtls() {
    if servers_available("no_message_lost_across_broker_kills_mtls") {
        no_message_lost_across_broker_kills(true).await;
    }
}

/// A broker whose mTLS listener trusts client certificates from both the
/// test CA and the other CA, as during a rotation, from the file
/// `client_ca`: write the other CA alone there and restart it to end the
/// rotation.
fn broker_during_rotation(pki: &Pki, ids: &[&Identity], client_ca: &std::path::Path) -> Mosquitto {
    let both = std::fs::read_to_string(pki.path("ca.crt")).unwrap()
        + &std::fs::read_to_string(pki.path("other-ca.crt")).unwrap();
    std::fs::write(client_ca, both).unwrap();
    Mosquitto::start_with(
        pki,
        &accounts(ids, CHANNEL_TOPICS),
        BrokerOptions {
            client_ca: Some(client_ca.to_owned()),
            ..Default::default()
        },
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificate_rotation_on_sighup_and_broken_files_at_reload() {
    if !servers_available("certificate_rotation_on_sighup_and_broken_files_at_reload") {
        return;
    }
    let pki = Pki::shared();
    let (proplet, manager) = (pki.identity("proplet"), pki.identity("manager"));
    let files = tempfile::tempdir().unwrap();
    let (cert, key, client_ca) = (
        files.path().join("client.crt"),
        files.path().join("client.key"),
        files.path().join("client-ca.pem"),
    );
    std::fs::copy(&proplet.cert, &cert).unwrap();
    std::fs::copy(&proplet.key, &key).unwrap();
    let mut broker = broker_during_rotation(pki, &[&proplet, &manager], &client_ca);
    let mut env = Env::new("PROPLET", &proplet);
    env.mtls(broker.mtls, pki, &proplet)
        .path("MQTT_TLS_CLIENT_CERT", &cert)
        .path("MQTT_TLS_CLIENT_KEY", &key)
        .set("LOG_LEVEL", "debug");
    let mut service = ServiceProcess::start("proplet", &env.vars);
    service.wait_for(CONNECTED, Duration::from_secs(10));
    let mut publisher = Env::new("MANAGER", &manager);
    publisher.plain(broker.plain);
    let received = format!("message received topic={START}");
    publish_once(&publisher, START, "1").await;
    service.wait_for_count(&received, 1, Duration::from_secs(10));

    // Rotate: a new pair from the other CA, then SIGHUP.
    std::fs::copy(pki.path("rotated.crt"), &cert).unwrap();
    std::fs::copy(pki.path("rotated.key"), &key).unwrap();
    service.signal("HUP");
    service.wait_for(
        "TLS files changed: using the new material",
        Duration::from_secs(5),
    );
    service.wait_for(
        "reconnecting with the new TLS material",
        Duration::from_secs(5),
    );
    service.wait_for_count(CONNECTED, 2, Duration::from_secs(10));
    // The broker now trusts only the new CA: the old pair would be refused.
    std::fs::copy(pki.path("other-ca.crt"), &client_ca).unwrap();
    broker.restart();
    service.wait_for_count(CONNECTED, 3, Duration::from_secs(10));
    publish_once(&publisher, START, "2").await;
    service.wait_for_count(&received, 2, Duration::from_secs(10));

    // A broken key at reload keeps the connection and the material in use.
    std::fs::write(&key, "not a key\n").unwrap();
    service.signal("HUP");
    let line = service.wait_for(
        "cannot be used; keeping the material in use",
        Duration::from_secs(5),
    );
    assert!(line.contains("PROPLET_MQTT_TLS_CLIENT_KEY="), "{line}");
    publish_once(&publisher, START, "3").await;
    service.wait_for_count(&received, 3, Duration::from_secs(10));
    let output = service.output();
    assert_eq!(
        output.matches(CONNECTED).count(),
        3,
        "the broken reload reconnected:\n{output}"
    );
    assert!(!output.contains(&proplet.secret), "{output}");
    assert!(service.terminate(Duration::from_secs(10)).success());
}

/// Kubernetes (a Secret volume, cert-manager) never signals: it writes the
/// new files into a fresh `..<timestamp>` directory and swaps the `..data`
/// symlink that the visible names point through. The service notices by
/// itself, and the broker then sees the new certificate: it trusts only
/// the new CA afterwards, and the service still connects.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kubernetes_secret_swap_is_picked_up_without_sighup() {
    if !servers_available("a_kubernetes_secret_swap_is_picked_up_without_sighup") {
        return;
    }
    use std::os::unix::fs::symlink;
    let pki = Pki::shared();
    let (proplet, manager) = (pki.identity("proplet"), pki.identity("manager"));
    let secret = tempfile::tempdir().unwrap();
    let version = |name: &str, cert: &std::path::Path, key: &std::path::Path| {
        let dir = secret.path().join(name);
        std::fs::create_dir(&dir).unwrap();
        std::fs::copy(cert, dir.join("tls.crt")).unwrap();
        std::fs::copy(key, dir.join("tls.key")).unwrap();
    };
    version("..2026_12_07_01", &proplet.cert, &proplet.key);
    symlink("..2026_12_07_01", secret.path().join("..data")).unwrap();
    for file in ["tls.crt", "tls.key"] {
        symlink(format!("..data/{file}"), secret.path().join(file)).unwrap();
    }
    let client_ca = secret.path().join("broker-client-ca.pem");
    let mut broker = broker_during_rotation(pki, &[&proplet, &manager], &client_ca);
    let mut env = Env::new("PROPLET", &proplet);
    env.mtls(broker.mtls, pki, &proplet)
        .path("MQTT_TLS_CLIENT_CERT", &secret.path().join("tls.crt"))
        .path("MQTT_TLS_CLIENT_KEY", &secret.path().join("tls.key"));
    let mut service = ServiceProcess::start("proplet", &env.vars);
    service.wait_for(CONNECTED, Duration::from_secs(10));

    // The swap, as the kubelet does it: a new directory, a new link under a
    // temporary name, renamed over `..data` (atomic).
    version(
        "..2026_12_07_02",
        &pki.path("rotated.crt"),
        &pki.path("rotated.key"),
    );
    symlink("..2026_12_07_02", secret.path().join("..data_tmp")).unwrap();
    std::fs::rename(
        secret.path().join("..data_tmp"),
        secret.path().join("..data"),
    )
    .unwrap();
    let swapped = std::time::Instant::now();
    service.wait_for(
        "the TLS files changed on disk: reconnecting with them",
        Duration::from_secs(30),
    );
    service.wait_for_count(CONNECTED, 2, Duration::from_secs(10));
    println!(
        "..data swap picked up and reconnected {:.1} s after it",
        swapped.elapsed().as_secs_f64()
    );
    // The broker now trusts only the new CA: the old pair would be refused.
    std::fs::copy(pki.path("other-ca.crt"), &client_ca).unwrap();
    broker.restart();
    service.wait_for_count(CONNECTED, 3, Duration::from_secs(20));
    let output = service.output();
    assert!(!output.contains("reloading TLS material"), "{output}");
    assert!(!output.contains(&proplet.secret), "{output}");
    assert!(service.terminate(Duration::from_secs(10)).success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_half_open_link_is_detected_within_twice_the_keep_alive() {
    if !servers_available("a_half_open_link_is_detected_within_twice_the_keep_alive") {
        return;
    }
    let pki = Pki::shared();
    let proplet = pki.identity("proplet");
    let broker = Mosquitto::for_clients(pki, &[&proplet]);
    let relay = Relay::start(broker.plain);
    let keep_alive = Duration::from_secs(2);
    let mut env = Env::new("PROPLET", &proplet);
    env.plain(relay.port).set("MQTT_KEEP_ALIVE", "2s");
    let config = ServiceConfig::from_vars(Service::Proplet, env.vars.clone()).unwrap();
    let (client, _) = Client::start(&config.mqtt, vec![]).unwrap();
    let mut state = client.state();
    timeout(
        Duration::from_secs(10),
        state.wait_for(|s| *s == ConnectionState::Connected),
    )
    .await
    .unwrap()
    .unwrap();

    let frozen = Instant::now();
    relay.freeze_open_connections();
    let failure = timeout(
        Duration::from_secs(10),
        state.wait_for(|s| matches!(s, ConnectionState::Retrying { .. })),
    )
    .await
    .expect("the dead link is noticed")
    .unwrap()
    .clone();
    let detected = frozen.elapsed();
    timeout(
        Duration::from_secs(10),
        state.wait_for(|s| *s == ConnectionState::Connected),
    )
    .await
    .unwrap()
    .unwrap();
    let reconnected = frozen.elapsed();
    // The waits above only guard against a hang: without the keep-alive
    // the kernel would take minutes. The figures are printed.
    println!("half-open link: keep-alive {keep_alive:?}, detected after {detected:?} ({failure:?}), reconnected after {reconnected:?}");
    client.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failover_to_the_second_broker_keeps_subscriptions() {
    if !servers_available("failover_to_the_second_broker_keeps_subscriptions") {
        return;
    }
    let pki = Pki::shared();
    let (proplet, manager) = (pki.identity("proplet"), pki.identity("manager"));
    let mut first = Mosquitto::for_clients(pki, &[&proplet, &manager]);
    let second = Mosquitto::for_clients(pki, &[&proplet, &manager]);
    let mut env = Env::new("PROPLET", &proplet);
    env.set(
        "MQTT_ADDRESS",
        &format!(
            "tcp://127.0.0.1:{},tcp://127.0.0.1:{}",
            first.plain, second.plain
        ),
    )
    .set("LOG_LEVEL", "debug");
    let service = ServiceProcess::start("proplet", &env.vars);
    // The connection line names the broker (the configuration line, which
    // also names the first, does not count).
    let on_first = format!(
        "{CONNECTED} mode=plain broker=tcp://127.0.0.1:{}",
        first.plain
    );
    service.wait_for(&on_first, Duration::from_secs(10));

    let killed = Instant::now();
    first.kill();
    let on_second = format!(
        "{CONNECTED} mode=plain broker=tcp://127.0.0.1:{}",
        second.plain
    );
    service.wait_for(&on_second, Duration::from_secs(10));
    let failed_over = killed.elapsed();
    let output = service.output();
    assert!(
        output.find(&on_first) < output.find(&on_second),
        "not connected to the first broker, then the second:\n{output}"
    );
    let mut publisher = Env::new("MANAGER", &manager);
    publisher.plain(second.plain);
    publish_once(&publisher, START, "on the second broker").await;
    service.wait_for(
        &format!("message received topic={START}"),
        Duration::from_secs(10),
    );
    println!("failover: established on the second broker {failed_over:?} after killing the first");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_down_at_start_and_a_short_outage() {
    if !servers_available("broker_down_at_start_and_a_short_outage") {
        return;
    }
    let pki = Pki::shared();
    let proplet = pki.identity("proplet");
    let mut broker = Mosquitto::for_clients(pki, &[&proplet]);
    broker.kill();
    let mut env = Env::new("PROPLET", &proplet);
    env.plain(broker.plain);
    // The container healthcheck reads this file.
    let health_dir = tempfile::tempdir().unwrap();
    let health = health_dir.path().join("health");
    env.vars
        .push(("PROPELLER_HEALTH_FILE".into(), health.display().to_string()));
    let service = ServiceProcess::start("proplet", &env.vars);
    service.wait_for("MQTT connection failed", Duration::from_secs(5));
    wait_for_file(&health, |text| {
        text.starts_with("disconnected: cannot reach the broker")
    });
    broker.start_again();
    let back = Instant::now();
    service.wait_for(CONNECTED, Duration::from_secs(5));
    let after_start = back.elapsed();
    let text = wait_for_file(&health, |text| text.starts_with("connected\n"));
    // The second line is the connection's metrics, as JSON.
    let metrics: serde_json::Value =
        serde_json::from_str(text.lines().nth(1).unwrap_or_default()).expect("a JSON line");
    assert_eq!(metrics["last_failure_class"], "unreachable", "{text}");
    assert_eq!(metrics["reconnects"], 0, "{text}");

    broker.kill();
    std::thread::sleep(Duration::from_secs(6));
    broker.start_again();
    let back = Instant::now();
    service.wait_for_count(CONNECTED, 2, Duration::from_secs(5));
    let after_outage = back.elapsed();
    // The waits only guard against a hang; the figures are printed.
    println!("broker down at start: connected {after_start:?} after it came up; 6 s outage: reconnected {after_outage:?} after it returned");
}

/// Waits (at most 10 s, a guard against a hang) until the file at `path`
/// satisfies `done`; the health file is written by a task of its own.
fn wait_for_file(path: &std::path::Path, done: impl Fn(&str) -> bool) -> String {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        if done(&text) {
            return text;
        }
        assert!(Instant::now() < deadline, "{}: {text:?}", path.display());
        std::thread::sleep(Duration::from_millis(20));
    }
}
