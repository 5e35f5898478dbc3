package main

// The relay's RabbitMQ publisher (AMQP 0-9-1, github.com/rabbitmq/amqp091-go):
// one connection and one channel in confirm mode. The client does not
// reconnect by itself; the relay dials a new publisher after any failure.

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/url"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	amqp "github.com/rabbitmq/amqp091-go"
)

// amqpConfig configures dialAMQP.
type amqpConfig struct {
	URL      string // amqp:// or amqps://
	Exchange string // a durable topic exchange, declared on connect
	// Timeout bounds the dial and handshake, and each Publish up to its
	// last confirm; a broker that does not answer within it (paused,
	// partitioned, blocked by an alarm) has its connection cut.
	Timeout time.Duration
	// Returned counts a message the broker returned as unroutable.
	Returned prometheusCounter
}

// prometheusCounter is what amqpPublisher counts returned messages on.
type prometheusCounter interface{ Inc() }

// amqpPublisher publishes to one exchange over one confirm-mode channel.
type amqpPublisher struct {
	url      string
	exchange string
	timeout  time.Duration
	nc       net.Conn // the TCP connection under conn, cut to end a stuck call
	conn     *amqp.Connection
	ch       *amqp.Channel
	blocked  atomic.Pointer[string] // the broker's reason while it blocks publishing
	done     sync.WaitGroup
}

// dialAMQP connects to cfg.URL, opens a confirm-mode channel and declares
// the exchange. Errors never carry the URL's password.
func dialAMQP(ctx context.Context, cfg amqpConfig) (*amqpPublisher, error) {
	p := &amqpPublisher{url: cfg.URL, exchange: cfg.Exchange, timeout: cfg.Timeout}
	conn, err := amqp.DialConfig(cfg.URL, amqp.Config{
		Heartbeat:  5 * time.Second,
		Properties: amqp.Table{"connection_name": "productsvc relay"},
		Dial: func(network, addr string) (net.Conn, error) {
			d := net.Dialer{Timeout: cfg.Timeout}
			c, err := d.DialContext(ctx, network, addr)
			if err != nil {
				return nil, err
			}
			c.SetDeadline(time.Now().Add(cfg.Timeout)) // the handshake; cleared once open
			p.nc = c                                   // DialConfig calls Dial once, before it returns
			return c, nil
		},
	})
	if err != nil {
		return nil, p.redact(fmt.Errorf("connect: %w", err))
	}
	p.conn = conn
	if err := p.open(cfg); err != nil {
		p.Close()
		return nil, p.redact(err)
	}
	return p, nil
}

func (p *amqpPublisher) open(cfg amqpConfig) error {
	ch, err := p.conn.Channel()
	if err != nil {
		return fmt.Errorf("open channel: %w", err)
	}
	p.ch = ch
	if err := ch.Confirm(false); err != nil {
		return fmt.Errorf("confirm mode: %w", err)
	}
	if err := ch.ExchangeDeclare(cfg.Exchange, amqp.ExchangeTopic, true, false, false, false, nil); err != nil {
		return fmt.Errorf("declare exchange %q: %w", cfg.Exchange, err)
	}
	returns := ch.NotifyReturn(make(chan amqp.Return, 64))
	blocks := p.conn.NotifyBlocked(make(chan amqp.Blocking, 4))
	p.done.Go(func() {
		for range returns {
			if cfg.Returned != nil {
				cfg.Returned.Inc()
			}
		}
	})
	p.done.Go(func() {
		for b := range blocks {
			if b.Active {
				reason := b.Reason
				p.blocked.Store(&reason)
			} else {
				p.blocked.Store(nil)
			}
		}
	})
	return nil
}

// Publish sends msgs in order, persistent and mandatory, and waits for the
// broker's confirms. It returns how many leading msgs the broker confirmed:
// all of them when the error is nil. After an error the publisher is done
// with: the caller closes it and dials another.
func (p *amqpPublisher) Publish(ctx context.Context, msgs []outMessage) (int, error) {
	if reason := p.blocked.Load(); reason != nil {
		return 0, fmt.Errorf("broker blocks publishing: %s", *reason)
	}
	ctx, cancel := context.WithTimeout(ctx, p.timeout)
	defer cancel()
	// A write to a broker that stopped reading blocks whatever its
	// context says: cutting the connection ends it.
	stop := context.AfterFunc(ctx, func() { p.nc.Close() })
	defer stop()
	confirms := make([]*amqp.DeferredConfirmation, 0, len(msgs))
	var err error
	for i := range msgs {
		m := &msgs[i]
		var dc *amqp.DeferredConfirmation
		dc, err = p.ch.PublishWithDeferredConfirmWithContext(ctx, p.exchange, m.Type, true, false, amqp.Publishing{
			ContentType:  cloudEventsContentType,
			DeliveryMode: amqp.Persistent,
			MessageId:    m.ID,
			Type:         m.Type,
			Timestamp:    m.Time,
			AppId:        "productsvc",
			Body:         m.Body,
		})
		if err != nil {
			err = fmt.Errorf("publish %s: %w", m.ID, err)
			break
		}
		confirms = append(confirms, dc)
	}
	confirmed := 0
	for i, dc := range confirms {
		ack, werr := dc.WaitContext(ctx)
		switch {
		case werr != nil:
			return confirmed, p.redact(fmt.Errorf("no confirm for %s: %w", msgs[i].ID, werr))
		case !ack:
			return confirmed, fmt.Errorf("broker did not confirm %s (nack, or the channel closed)", msgs[i].ID)
		}
		confirmed++
	}
	return confirmed, p.redact(err)
}

// Close closes the connection, waiting at most a second for the broker.
func (p *amqpPublisher) Close() error {
	if p.nc != nil {
		p.nc.SetDeadline(time.Now().Add(time.Second))
	}
	if p.conn != nil {
		p.conn.Close()
	}
	if p.nc != nil {
		p.nc.Close()
	}
	p.done.Wait()
	return nil
}

// redact removes the URL's password from err's text.
func (p *amqpPublisher) redact(err error) error {
	if err == nil {
		return nil
	}
	u, perr := url.Parse(p.url)
	if perr != nil {
		return err
	}
	if pw, ok := u.User.Password(); ok && pw != "" && strings.Contains(err.Error(), pw) {
		return errors.New(strings.ReplaceAll(err.Error(), pw, "xxxxx"))
	}
	return err
}
