// The Eclipse paho.mqtt.golang peer of examples/bench.rs: the same
// measurements as our client, one per process.
//
// Builds in GOPATH mode with Debian's packages (the harness does this):
//
//	apt-get install -y golang-go golang-github-eclipse-paho.mqtt.golang-dev
//	GO111MODULE=off GOPATH=/usr/share/gocode go build -o paho-bench examples/peers/paho_go/main.go
//
// Usage (an empty ca means plain MQTT, an empty cert means no client certificate):
//
//	paho-bench connect HOST PORT ID USER PASS CA CERT KEY
//	    prints the microseconds from building the client (files read) to CONNACK
//	paho-bench publish HOST PORT ID USER PASS CA CERT KEY TOPIC COUNT SIZE QOS
//	    publishes COUNT messages of SIZE bytes, waits until each is sent (QoS 0)
//	    or acknowledged (QoS 1), and prints "START_UNIX_NS ELAPSED_NS CPU_NS":
//	    the wall clock at the first publish, the time until the last
//	    acknowledgement, and the process's CPU time (user + system) over it.
package main

import (
	"crypto/tls"
	"crypto/x509"
	"fmt"
	"io/ioutil"
	"os"
	"strconv"
	"syscall"
	"time"

	mqtt "github.com/eclipse/paho.mqtt.golang"
)

func fail(format string, args ...interface{}) {
	fmt.Fprintf(os.Stderr, "paho-bench: "+format+"\n", args...)
	os.Exit(1)
}

func cpuNanos() int64 {
	var usage syscall.Rusage
	if err := syscall.Getrusage(syscall.RUSAGE_SELF, &usage); err != nil {
		fail("getrusage: %v", err)
	}
	return usage.Utime.Nano() + usage.Stime.Nano()
}

// connect builds the client as an application would (TLS files read), and
// connects. Returns once CONNACK has arrived.
func connect(args []string) mqtt.Client {
	host, port, id, user, pass, ca, cert, key := args[0], args[1], args[2], args[3], args[4], args[5], args[6], args[7]
	options := mqtt.NewClientOptions()
	scheme := "tcp"
	if ca != "" {
		scheme = "ssl"
		pem, err := ioutil.ReadFile(ca)
		if err != nil {
			fail("read %s: %v", ca, err)
		}
		roots := x509.NewCertPool()
		if !roots.AppendCertsFromPEM(pem) {
			fail("no certificate in %s", ca)
		}
		config := &tls.Config{RootCAs: roots}
		if cert != "" {
			pair, err := tls.LoadX509KeyPair(cert, key)
			if err != nil {
				fail("load %s: %v", cert, err)
			}
			config.Certificates = []tls.Certificate{pair}
		}
		options.SetTLSConfig(config)
	}
	options.AddBroker(scheme + "://" + host + ":" + port)
	options.SetClientID(id).SetUsername(user).SetPassword(pass)
	options.SetCleanSession(true).SetAutoReconnect(false).SetProtocolVersion(4)
	options.SetKeepAlive(30 * time.Second).SetConnectTimeout(10 * time.Second)
	client := mqtt.NewClient(options)
	token := client.Connect()
	if !token.WaitTimeout(10 * time.Second) {
		fail("no CONNACK within 10 s")
	}
	if err := token.Error(); err != nil {
		fail("connect: %v", err)
	}
	return client
}

func main() {
	if len(os.Args) < 10 {
		fail("usage: paho-bench connect|publish HOST PORT ID USER PASS CA CERT KEY [TOPIC COUNT SIZE QOS]")
	}
	args := os.Args[2:]
	switch os.Args[1] {
	case "connect":
		started := time.Now()
		client := connect(args)
		took := time.Since(started)
		fmt.Println(took.Microseconds())
		client.Disconnect(0)
	case "publish":
		if len(args) < 12 {
			fail("publish needs TOPIC COUNT SIZE QOS")
		}
		topic := args[8]
		count, _ := strconv.Atoi(args[9])
		size, _ := strconv.Atoi(args[10])
		qos, _ := strconv.Atoi(args[11])
		client := connect(args)
		payload := make([]byte, size)
		for i := range payload {
			payload[i] = 'x'
		}
		tokens := make([]mqtt.Token, 0, count)
		startWall := time.Now()
		startCPU := cpuNanos()
		for i := 0; i < count; i++ {
			tokens = append(tokens, client.Publish(topic, byte(qos), false, payload))
		}
		for _, token := range tokens {
			if !token.WaitTimeout(60 * time.Second) {
				fail("a publish was not acknowledged within 60 s")
			}
			if err := token.Error(); err != nil {
				fail("publish: %v", err)
			}
		}
		elapsed := time.Since(startWall)
		cpu := cpuNanos() - startCPU
		fmt.Printf("%d %d %d\n", startWall.UnixNano(), elapsed.Nanoseconds(), cpu)
		client.Disconnect(250)
	default:
		fail("unknown command %q", os.Args[1])
	}
}
