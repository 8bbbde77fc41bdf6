"""The Python paho-mqtt peer of examples/bench.rs (pip install paho-mqtt).

    python3 paho_bench.py connect N HOST PORT USER PASS [CA CERT KEY]
        prints the median and p90 milliseconds from connect() to CONNACK
    python3 paho_bench.py publish COUNT SIZE QOS TOPIC HOST PORT USER PASS [CA CERT KEY]
        publishes COUNT messages of SIZE bytes, waits for the last one, prints seconds
"""
import ssl
import statistics
import sys
import threading
import time

import paho.mqtt.client as mqtt


def client(host, port, user, password, tls, client_id):
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv311)
    c.username_pw_set(user, password)
    if tls:
        ca, cert, key = tls
        c.tls_set(ca_certs=ca, certfile=cert or None, keyfile=key or None, tls_version=ssl.PROTOCOL_TLS_CLIENT)
    return c


def connect_once(host, port, user, password, tls):
    done = threading.Event()
    c = client(host, port, user, password, tls, user)
    c.on_connect = lambda *args: done.set()
    start = time.perf_counter()
    c.connect(host, port)
    c.loop_start()
    if not done.wait(10):
        raise SystemExit("no CONNACK")
    took = time.perf_counter() - start
    c.disconnect()
    c.loop_stop()
    return took


def main():
    mode = sys.argv[1]
    if mode == "connect":
        n, host, port, user, password = int(sys.argv[2]), sys.argv[3], int(sys.argv[4]), sys.argv[5], sys.argv[6]
        tls = tuple(sys.argv[7:10]) if len(sys.argv) > 7 else None
        times = sorted(connect_once(host, port, user, password, tls) for _ in range(n))
        print(f"{statistics.median(times) * 1000:.2f} {times[int(len(times) * 0.9) - 1] * 1000:.2f}")
    elif mode == "publish":
        count, size, qos, topic = int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
        host, port, user, password = sys.argv[6], int(sys.argv[7]), sys.argv[8], sys.argv[9]
        tls = tuple(sys.argv[10:13]) if len(sys.argv) > 10 else None
        connected = threading.Event()
        c = client(host, port, user, password, tls, user)
        c.on_connect = lambda *args: connected.set()
        c.max_inflight_messages_set(100)
        c.max_queued_messages_set(0)
        c.connect(host, port)
        c.loop_start()
        connected.wait(10)
        payload = b"x" * size
        start = time.perf_counter()
        info = None
        for _ in range(count):
            info = c.publish(topic, payload, qos=qos)
        info.wait_for_publish(120)
        print(f"{time.perf_counter() - start:.4f}")
        c.disconnect()
        c.loop_stop()


if __name__ == "__main__":
    main()
