// Package pgtest starts a throwaway PostgreSQL server for tests: Debian's
// postgresql package, initdb into a temporary directory (as the postgres
// user when the tests run as root), listening on a free 127.0.0.1 port.
// The unit tests and the black-box suite share it.
package pgtest

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"os/user"
	"path/filepath"
	"slices"
	"strconv"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/jackc/pgx/v5"
)

// Server is a running PostgreSQL server. Every database on it is reached
// as the superuser postgres without a password (trust on loopback).
type Server struct {
	durable bool
	dir     string
	port    int
	cmd     *exec.Cmd
	cred    *syscall.Credential
	bin     string
	n       atomic.Int64
}

// Start initialises a cluster and starts a server. Settings trade
// durability for speed (fsync off): the tests kill the service, not the
// machine. It returns an error when PostgreSQL is not installed.
func Start() (*Server, error) { return start(false) }

// StartDurable is Start with PostgreSQL's durable defaults (fsync and
// synchronous_commit on), for benchmarks that compare durable writes.
func StartDurable() (*Server, error) { return start(true) }

func start(durable bool) (*Server, error) {
	bin, err := binDir()
	if err != nil {
		return nil, err
	}
	dir, err := os.MkdirTemp("", "productsvc-pg-")
	if err != nil {
		return nil, err
	}
	s := &Server{dir: dir, bin: bin, durable: durable}
	if os.Geteuid() == 0 { // PostgreSQL refuses to run as root
		u, err := user.Lookup("postgres")
		if err != nil {
			os.RemoveAll(dir)
			return nil, fmt.Errorf("running as root needs the postgres user: %w", err)
		}
		uid, _ := strconv.Atoi(u.Uid)
		gid, _ := strconv.Atoi(u.Gid)
		if err := os.Chown(dir, uid, gid); err != nil {
			os.RemoveAll(dir)
			return nil, err
		}
		s.cred = &syscall.Credential{Uid: uint32(uid), Gid: uint32(gid)}
	}
	data := filepath.Join(dir, "data")
	init := s.command("initdb", "-D", data, "-U", "postgres", "-A", "trust", "-E", "UTF8", "--locale=C", "--no-sync")
	if out, err := init.CombinedOutput(); err != nil {
		os.RemoveAll(dir)
		return nil, fmt.Errorf("initdb: %v: %s", err, out)
	}
	if err := s.start(); err != nil {
		os.RemoveAll(dir)
		return nil, err
	}
	return s, nil
}

func (s *Server) start() error {
	if s.port == 0 {
		port, err := freePort()
		if err != nil {
			return err
		}
		s.port = port
	}
	log, err := os.OpenFile(filepath.Join(s.dir, "postgres.log"), os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		return err
	}
	defer log.Close()
	args := []string{"-D", filepath.Join(s.dir, "data"), "-p", strconv.Itoa(s.port), "-k", s.dir,
		"-c", "listen_addresses=127.0.0.1", "-c", "max_connections=300", "-c", "shared_buffers=64MB"}
	if !s.durable {
		args = append(args, "-c", "fsync=off", "-c", "full_page_writes=off")
	}
	s.cmd = s.command("postgres", args...)
	s.cmd.Stdout, s.cmd.Stderr = log, log
	if err := s.cmd.Start(); err != nil {
		return fmt.Errorf("start postgres: %w", err)
	}
	deadline := time.Now().Add(30 * time.Second)
	for {
		ctx, cancel := context.WithTimeout(context.Background(), time.Second)
		conn, err := pgx.Connect(ctx, s.URL("postgres"))
		cancel()
		if err == nil {
			conn.Close(context.Background())
			return nil
		}
		if time.Now().After(deadline) {
			s.cmd.Process.Kill()
			s.cmd.Wait()
			b, _ := os.ReadFile(filepath.Join(s.dir, "postgres.log"))
			return fmt.Errorf("postgres did not accept connections within 30s: %v\n%s", err, b)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

func (s *Server) command(name string, args ...string) *exec.Cmd {
	cmd := exec.Command(filepath.Join(s.bin, name), args...)
	cmd.Dir = s.dir
	cmd.Env = append(os.Environ(), "LC_ALL=C")
	if s.cred != nil {
		cmd.SysProcAttr = &syscall.SysProcAttr{Credential: s.cred}
	}
	return cmd
}

// URL returns the connection URL of database db.
func (s *Server) URL(db string) string {
	return fmt.Sprintf("postgres://postgres@127.0.0.1:%d/%s?sslmode=disable", s.port, db)
}

// Tool returns the path of the server's client program name (pg_dump,
// pg_restore, psql): the one of the server's version.
func (s *Server) Tool(name string) string { return filepath.Join(s.bin, name) }

// Port returns the server's port.
func (s *Server) Port() int { return s.port }

// CreateDatabase creates a new, empty database and returns its URL.
func (s *Server) CreateDatabase(ctx context.Context) (name, url string, err error) {
	name = fmt.Sprintf("test_%d_%d", os.Getpid(), s.n.Add(1))
	conn, err := pgx.Connect(ctx, s.URL("postgres"))
	if err != nil {
		return "", "", err
	}
	defer conn.Close(ctx)
	if _, err := conn.Exec(ctx, "CREATE DATABASE "+name); err != nil {
		return "", "", err
	}
	return name, s.URL(name), nil
}

// DropDatabase drops database name, closing its connections.
func (s *Server) DropDatabase(ctx context.Context, name string) error {
	conn, err := pgx.Connect(ctx, s.URL("postgres"))
	if err != nil {
		return err
	}
	defer conn.Close(ctx)
	_, err = conn.Exec(ctx, "DROP DATABASE IF EXISTS "+name+" WITH (FORCE)")
	return err
}

// Kill stops the server at once (SIGKILL) without removing its data.
func (s *Server) Kill() {
	if s.cmd != nil && s.cmd.Process != nil {
		s.cmd.Process.Kill()
		s.cmd.Wait()
		s.cmd = nil
	}
}

// ShutdownMode is how Shutdown stops a server.
type ShutdownMode int

const (
	// Fast ends every session and writes a checkpoint before exiting
	// (SIGINT), as an operator's restart does.
	Fast ShutdownMode = iota
	// Immediate makes every server process quit at once (SIGQUIT), as a
	// crash would; the restart recovers from the write-ahead log.
	Immediate
)

// Shutdown stops the server in mode and waits for every server process to
// exit, keeping the data directory and the port for Restart. Unlike Kill,
// which leaves the backends of a killed postmaster to notice by
// themselves, nothing of the old server is left when it returns.
func (s *Server) Shutdown(mode ShutdownMode) error {
	if s.cmd == nil || s.cmd.Process == nil {
		return errors.New("pgtest: the server is not running")
	}
	sig := syscall.SIGINT
	if mode == Immediate {
		sig = syscall.SIGQUIT
	}
	if err := s.cmd.Process.Signal(sig); err != nil {
		return fmt.Errorf("pgtest: signal postgres: %w", err)
	}
	done := make(chan struct{})
	go func() { s.cmd.Wait(); close(done) }() // an immediate shutdown exits non-zero
	select {
	case <-done:
	case <-time.After(30 * time.Second):
		s.cmd.Process.Kill()
		<-done
		s.cmd = nil
		return errors.New("pgtest: postgres did not shut down within 30s; killed it")
	}
	s.cmd = nil
	return nil
}

// Restart starts a killed or shut down server again on the same port.
func (s *Server) Restart() error {
	// A killed postmaster leaves its pid file; PostgreSQL checks the pid
	// inside is no longer running and starts anyway.
	return s.start()
}

// Stop shuts the server down and removes its files.
func (s *Server) Stop() {
	if s.cmd != nil && s.cmd.Process != nil {
		s.cmd.Process.Signal(syscall.SIGQUIT) // immediate shutdown: the data is thrown away
		done := make(chan struct{})
		go func() { s.cmd.Wait(); close(done) }()
		select {
		case <-done:
		case <-time.After(10 * time.Second):
			s.cmd.Process.Kill()
			<-done
		}
	}
	os.RemoveAll(s.dir)
}

// binDir finds the directory holding initdb and postgres: Debian keeps
// them in /usr/lib/postgresql/VERSION/bin, off PATH.
func binDir() (string, error) {
	dirs, _ := filepath.Glob("/usr/lib/postgresql/*/bin")
	slices.SortFunc(dirs, func(a, b string) int { return versionOf(b) - versionOf(a) })
	for _, d := range dirs {
		if _, err := os.Stat(filepath.Join(d, "initdb")); err == nil {
			return d, nil
		}
	}
	if p, err := exec.LookPath("initdb"); err == nil {
		return filepath.Dir(p), nil
	}
	return "", errors.New("PostgreSQL is not installed (no initdb in /usr/lib/postgresql/*/bin or on PATH)")
}

func versionOf(dir string) int {
	v, _ := strconv.Atoi(filepath.Base(filepath.Dir(dir)))
	return v
}

func freePort() (int, error) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return 0, err
	}
	defer ln.Close()
	return ln.Addr().(*net.TCPAddr).Port, nil
}
