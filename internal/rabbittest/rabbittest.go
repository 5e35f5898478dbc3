// Package rabbittest starts a throwaway RabbitMQ server for tests: the
// Debian package's rabbitmq-server with its own node name, ports (AMQP,
// distribution, epmd; all on 127.0.0.1), directories and configuration
// under a temporary directory, and an epmd of its own. Every process it
// starts is ended by its id (the process groups it made), never by name.
package rabbittest

import (
	"bytes"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"sync"
	"syscall"
	"time"

	amqp "github.com/rabbitmq/amqp091-go"
)

// Server is a running (or killed, or paused) RabbitMQ server.
type Server struct {
	// URL is the AMQP URL of the server's guest user.
	URL string

	dir, bin string
	env      []string
	log      *logBuffer

	mu   sync.Mutex
	cmd  *exec.Cmd
	done chan struct{}
	epmd *exec.Cmd
}

// binary finds rabbitmq-server: the Debian package's /usr/sbin wrapper
// switches to the rabbitmq user when run as root, so the script it wraps
// is preferred.
func binary() (string, error) {
	if _, err := os.Stat("/usr/lib/rabbitmq/bin/rabbitmq-server"); err == nil {
		return "/usr/lib/rabbitmq/bin/rabbitmq-server", nil
	}
	return exec.LookPath("rabbitmq-server")
}

// Start starts a server and returns once it takes AMQP connections (about
// 10 s). Stop ends it.
func Start() (*Server, error) {
	bin, err := binary()
	if err != nil {
		return nil, fmt.Errorf("rabbitmq-server is not installed: %w", err)
	}
	epmdBin, err := exec.LookPath("epmd")
	if err != nil {
		return nil, fmt.Errorf("epmd is not installed: %w", err)
	}
	dir, err := os.MkdirTemp("", "productsvc-rabbitmq-")
	if err != nil {
		return nil, err
	}
	var ports [3]int
	for i := range ports {
		if ports[i], err = freePort(); err != nil {
			os.RemoveAll(dir)
			return nil, err
		}
	}
	node, dist, epmdPort := ports[0], ports[1], ports[2]
	for _, d := range []string{"home", "mnesia", "log"} {
		if err := os.MkdirAll(filepath.Join(dir, d), 0o755); err != nil {
			os.RemoveAll(dir)
			return nil, err
		}
	}
	conf := fmt.Sprintf("listeners.tcp.1 = 127.0.0.1:%d\nlog.console = true\nlog.console.level = warning\nlog.file = false\n", node)
	if err := os.WriteFile(filepath.Join(dir, "rabbitmq.conf"), []byte(conf), 0o644); err != nil {
		os.RemoveAll(dir)
		return nil, err
	}
	if err := os.WriteFile(filepath.Join(dir, "enabled_plugins"), []byte("[].\n"), 0o644); err != nil {
		os.RemoveAll(dir)
		return nil, err
	}
	s := &Server{dir: dir, bin: bin, log: &logBuffer{},
		URL: fmt.Sprintf("amqp://guest:guest@127.0.0.1:%d/", node)}
	s.env = append(os.Environ(),
		"HOME="+filepath.Join(dir, "home"),
		fmt.Sprintf("RABBITMQ_NODENAME=productsvc-test-%d@localhost", node),
		"RABBITMQ_NODE_IP_ADDRESS=127.0.0.1",
		fmt.Sprintf("RABBITMQ_NODE_PORT=%d", node),
		fmt.Sprintf("RABBITMQ_DIST_PORT=%d", dist),
		fmt.Sprintf("ERL_EPMD_PORT=%d", epmdPort),
		"ERL_EPMD_ADDRESS=127.0.0.1",
		"RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS=-kernel inet_dist_use_interface {127,0,0,1}",
		"RABBITMQ_CONFIG_FILE="+filepath.Join(dir, "rabbitmq.conf"),
		"RABBITMQ_ENABLED_PLUGINS_FILE="+filepath.Join(dir, "enabled_plugins"),
		"RABBITMQ_MNESIA_BASE="+filepath.Join(dir, "mnesia"),
		"RABBITMQ_LOG_BASE="+filepath.Join(dir, "log"),
		"RABBITMQ_PID_FILE="+filepath.Join(dir, "rabbitmq.pid"),
		"RABBITMQ_LOGS=-",
	)
	// Our own epmd, as a child, so that its pid is ours to end.
	s.epmd = exec.Command(epmdBin, "-port", strconv.Itoa(epmdPort), "-address", "127.0.0.1")
	s.epmd.Env = s.env
	s.epmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	s.epmd.Stdout, s.epmd.Stderr = s.log, s.log
	if err := s.epmd.Start(); err != nil {
		os.RemoveAll(dir)
		return nil, fmt.Errorf("start epmd: %w", err)
	}
	go s.epmd.Wait()
	if err := s.start(); err != nil {
		s.Stop()
		return nil, err
	}
	return s, nil
}

// start runs rabbitmq-server and waits until it takes AMQP connections.
func (s *Server) start() error {
	cmd := exec.Command(s.bin)
	cmd.Env = s.env
	cmd.Dir = s.dir
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true} // its processes form one group, ended together
	cmd.Stdout, cmd.Stderr = s.log, s.log
	if err := cmd.Start(); err != nil {
		return fmt.Errorf("start rabbitmq-server: %w", err)
	}
	done := make(chan struct{})
	go func() {
		cmd.Wait()
		close(done)
	}()
	s.mu.Lock()
	s.cmd, s.done = cmd, done
	s.mu.Unlock()
	deadline := time.Now().Add(90 * time.Second)
	for time.Now().Before(deadline) {
		if c, err := amqp.DialConfig(s.URL, amqp.Config{Dial: amqp.DefaultDial(time.Second)}); err == nil {
			c.Close()
			return nil
		}
		select {
		case <-done:
			return fmt.Errorf("rabbitmq-server exited at start:\n%s", s.log)
		case <-time.After(100 * time.Millisecond):
		}
	}
	s.Kill()
	return fmt.Errorf("rabbitmq-server did not take connections within 90s:\n%s", s.log)
}

// signal sends sig to the server's process group.
func (s *Server) signal(sig syscall.Signal) {
	s.mu.Lock()
	cmd := s.cmd
	s.mu.Unlock()
	if cmd != nil {
		syscall.Kill(-cmd.Process.Pid, sig)
	}
}

// Kill kills the server's processes with SIGKILL and waits for it to exit.
// Killing a killed server does nothing.
func (s *Server) Kill() {
	s.mu.Lock()
	cmd, done := s.cmd, s.done
	s.cmd = nil
	s.mu.Unlock()
	if cmd == nil {
		return
	}
	syscall.Kill(-cmd.Process.Pid, syscall.SIGCONT) // a paused server too
	syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL)
	<-done
}

// Restart kills the server and starts it again on its ports and data:
// durable exchanges, queues and persistent messages survive, as after a
// crash.
func (s *Server) Restart() error {
	s.Kill()
	return s.start()
}

// Pause stops every process of the server with SIGSTOP: connections stay
// open and nothing answers.
func (s *Server) Pause() { s.signal(syscall.SIGSTOP) }

// Resume continues a paused server.
func (s *Server) Resume() { s.signal(syscall.SIGCONT) }

// Ctl runs rabbitmqctl against the server, e.g. Ctl("set_vm_memory_high_watermark", "0.000001").
func (s *Server) Ctl(args ...string) error {
	bin := filepath.Join(filepath.Dir(s.bin), "rabbitmqctl")
	if _, err := os.Stat(bin); err != nil {
		bin = "rabbitmqctl"
	}
	cmd := exec.Command(bin, args...)
	cmd.Env = s.env
	cmd.Dir = s.dir
	if out, err := cmd.CombinedOutput(); err != nil {
		return fmt.Errorf("rabbitmqctl %v: %w\n%s", args, err, out)
	}
	return nil
}

// Stop ends the server and its epmd and removes its directory.
func (s *Server) Stop() {
	s.Kill()
	if s.epmd != nil && s.epmd.Process != nil {
		syscall.Kill(-s.epmd.Process.Pid, syscall.SIGKILL)
	}
	os.RemoveAll(s.dir)
}

func freePort() (int, error) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return 0, err
	}
	defer ln.Close()
	return ln.Addr().(*net.TCPAddr).Port, nil
}

// logBuffer keeps the server's output for error messages.
type logBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (l *logBuffer) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.b.Len() > 1<<20 {
		l.b.Reset() // a server's whole life story is not needed, its last words are
	}
	return l.b.Write(p)
}

func (l *logBuffer) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.String()
}
