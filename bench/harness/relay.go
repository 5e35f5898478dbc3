package main

// The relay's part of workload i: a throwaway RabbitMQ server, and a
// consumer that measures the lag from commit to broker delivery.

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"math"
	"os"
	"os/signal"
	"slices"
	"strconv"
	"syscall"
	"time"

	amqp "github.com/rabbitmq/amqp091-go"

	"productsvc/internal/rabbittest"
)

// cmdRabbitMQ starts a throwaway RabbitMQ server the way the tests do
// (internal/rabbittest: its own node name, ports, epmd and directories,
// the latter under TMPDIR), prints "listening AMQP_URL" and stops it on
// SIGTERM.
func cmdRabbitMQ(ctx context.Context, stdout io.Writer) error {
	ctx, stop := signal.NotifyContext(ctx, os.Interrupt, syscall.SIGTERM)
	defer stop()
	srv, err := rabbittest.Start()
	if err != nil {
		return err
	}
	defer srv.Stop()
	fmt.Fprintf(stdout, "listening %s\n", srv.URL)
	<-ctx.Done()
	return nil
}

// cmdRelaylag declares -exchange (the durable topic exchange the relay
// publishes to) and a queue of its own bound to it with "#", prints
// "following", then consumes for -duration. For each message's first
// delivery (deduplicated by message id) it takes the receive time minus the
// CloudEvent's time (the event's occurred_at, taken in the write's
// transaction; same host, same clock) and at the end prints one line:
// events=N p50_ms= p99_ms= max_ms= out_of_order= duplicates=, also to -o.
func cmdRelaylag(ctx context.Context, args []string, stdout io.Writer) error {
	fs := flag.NewFlagSet("relaylag", flag.ContinueOnError)
	url := fs.String("amqp", "", "the broker's AMQP URL")
	exchange := fs.String("exchange", "", "the exchange the relay publishes to")
	duration := fs.Duration("duration", 10*time.Second, "how long to consume")
	outPath := fs.String("o", "", "also write the summary line here")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if *url == "" || *exchange == "" {
		return errors.New("relaylag: -amqp and -exchange are required")
	}
	conn, err := amqp.DialConfig(*url, amqp.Config{Dial: amqp.DefaultDial(5 * time.Second)})
	if err != nil {
		return err
	}
	defer conn.Close()
	ch, err := conn.Channel()
	if err != nil {
		return err
	}
	if err := ch.ExchangeDeclare(*exchange, amqp.ExchangeTopic, true, false, false, false, nil); err != nil {
		return err
	}
	// Server-named, exclusive, deleted with the connection.
	q, err := ch.QueueDeclare("", false, true, true, false, nil)
	if err != nil {
		return err
	}
	if err := ch.QueueBind(q.Name, "#", *exchange, false, nil); err != nil {
		return err
	}
	if err := ch.Qos(1000, 0, false); err != nil {
		return err
	}
	ctx, cancel := context.WithTimeout(ctx, *duration)
	defer cancel()
	ds, err := ch.ConsumeWithContext(ctx, q.Name, "", true, true, false, false, nil)
	if err != nil {
		return err
	}
	fmt.Fprintf(stdout, "following %s via %s\n", *exchange, q.Name)

	var lags []float64 // milliseconds
	seen := map[string]bool{}
	duplicates, outOfOrder := 0, 0
	var last int64
	closed := conn.NotifyClose(make(chan *amqp.Error, 1))
loop:
	for {
		select {
		case <-ctx.Done():
			break loop
		case err := <-closed:
			return fmt.Errorf("connection closed: %v", err)
		case d, ok := <-ds:
			if !ok {
				break loop
			}
			received := time.Now()
			if seen[d.MessageId] {
				duplicates++
				continue
			}
			seen[d.MessageId] = true
			var ce struct {
				Time     time.Time `json:"time"`
				Sequence string    `json:"sequence"`
			}
			if err := json.Unmarshal(d.Body, &ce); err != nil {
				return fmt.Errorf("message %s: %w", d.MessageId, err)
			}
			if seq, err := strconv.ParseInt(ce.Sequence, 10, 64); err == nil {
				if seq <= last {
					outOfOrder++
				}
				last = seq
			}
			lags = append(lags, float64(received.Sub(ce.Time))/1e6)
		}
	}
	slices.Sort(lags)
	pct := func(q float64) float64 {
		if len(lags) == 0 {
			return 0
		}
		return lags[min(len(lags)-1, max(0, int(math.Ceil(q*float64(len(lags))))-1))]
	}
	line := fmt.Sprintf("events=%d p50_ms=%.2f p99_ms=%.2f max_ms=%.2f out_of_order=%d duplicates=%d\n",
		len(lags), pct(0.50), pct(0.99), pct(1), outOfOrder, duplicates)
	if *outPath != "" {
		if err := os.WriteFile(*outPath, []byte(line), 0o644); err != nil {
			return err
		}
	}
	_, err = io.WriteString(stdout, line)
	return err
}
