package rabbittest

import (
	"context"
	"sync"
	"time"

	amqp "github.com/rabbitmq/amqp091-go"
)

// Delivery is one message a Consumer received.
type Delivery struct {
	RoutingKey, MessageID, Type, ContentType, AppID string
	DeliveryMode                                    uint8
	Timestamp                                       time.Time
	Body                                            []byte
	Received                                        time.Time // when the consumer got it
}

// Consumer receives everything published to an exchange through a durable
// queue bound with "#", reconnecting after the broker fails. A message is
// acknowledged once recorded, so a broker crash loses none (it may deliver
// one again).
type Consumer struct {
	cancel context.CancelFunc
	wg     sync.WaitGroup

	mu  sync.Mutex
	got []Delivery
}

// Consume declares exchange (a durable topic exchange) and the durable
// queue exchange+".all" bound to it with "#", and consumes it until Close.
func Consume(url, exchange string) (*Consumer, error) {
	queue := exchange + ".all"
	if err := declare(url, exchange, queue); err != nil {
		return nil, err
	}
	ctx, cancel := context.WithCancel(context.Background())
	c := &Consumer{cancel: cancel}
	c.wg.Go(func() {
		for ctx.Err() == nil {
			c.consume(ctx, url, queue)
			select {
			case <-ctx.Done():
			case <-time.After(100 * time.Millisecond):
			}
		}
	})
	return c, nil
}

// Close stops consuming.
func (c *Consumer) Close() {
	c.cancel()
	c.wg.Wait()
}

func declare(url, exchange, queue string) error {
	conn, err := amqp.Dial(url)
	if err != nil {
		return err
	}
	defer conn.Close()
	ch, err := conn.Channel()
	if err != nil {
		return err
	}
	if err := ch.ExchangeDeclare(exchange, amqp.ExchangeTopic, true, false, false, false, nil); err != nil {
		return err
	}
	if _, err := ch.QueueDeclare(queue, true, false, false, false, nil); err != nil {
		return err
	}
	return ch.QueueBind(queue, "#", exchange, false, nil)
}

func (c *Consumer) consume(ctx context.Context, url, queue string) {
	conn, err := amqp.DialConfig(url, amqp.Config{Heartbeat: 2 * time.Second, Dial: amqp.DefaultDial(2 * time.Second)})
	if err != nil {
		return
	}
	defer conn.Close()
	ch, err := conn.Channel()
	if err != nil {
		return
	}
	ds, err := ch.ConsumeWithContext(ctx, queue, "", false, false, false, false, nil)
	if err != nil {
		return
	}
	for {
		select {
		case <-ctx.Done():
			return
		case d, ok := <-ds:
			if !ok {
				return
			}
			c.mu.Lock()
			c.got = append(c.got, Delivery{RoutingKey: d.RoutingKey, MessageID: d.MessageId, Type: d.Type,
				ContentType: d.ContentType, AppID: d.AppId, DeliveryMode: d.DeliveryMode, Timestamp: d.Timestamp,
				Body: d.Body, Received: time.Now()})
			c.mu.Unlock()
			d.Ack(false)
		}
	}
}

// Deliveries returns what arrived so far, in arrival order.
func (c *Consumer) Deliveries() []Delivery {
	c.mu.Lock()
	defer c.mu.Unlock()
	return append([]Delivery(nil), c.got...)
}

// Distinct returns how many distinct message ids arrived, and how many
// deliveries repeated one.
func (c *Consumer) Distinct() (ids, duplicates int) {
	seen := map[string]bool{}
	for _, d := range c.Deliveries() {
		if seen[d.MessageID] {
			duplicates++
		}
		seen[d.MessageID] = true
	}
	return len(seen), duplicates
}
