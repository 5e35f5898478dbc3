package main

import (
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/url"
	"os"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"time"

	"github.com/redis/go-redis/v9"
)

// config is the service's configuration: each setting comes from its flag
// if given, else its environment variable, else its default.
type config struct {
	Addr            string
	DatabaseURL     string
	DBPath          string
	DBSync          string
	DBTimeout       time.Duration
	RedisURL        string
	RedisTimeout    time.Duration
	CacheTTL        time.Duration
	LocalCacheSize  int
	CacheMemory     int
	APITokens       []string
	APITokensFile   string
	TrustedProxies  trustedProxies
	JWTIssuer       string
	JWTAudience     string
	JWTJWKSURL      string
	JWTMaxHeld      int
	LogLevel        slog.Level
	ShutdownDelay   time.Duration
	ShutdownTimeout time.Duration
	MetricsAddr     string
	AdminAddr       string
	RateLimitRPS    float64
	RateLimitBurst  int
	MaxInFlight     int
	EventsRetention time.Duration
	FeedMaxStreams  int
	MaxConns        int
	MaxConnsPerIP   int
	BackupDir       string        // empty: a backups directory beside DBPath
	BackupInterval  time.Duration // 0: no scheduled backups
	BackupKeep      int           // 0: keep every backup
	AMQPURL         string
	AMQPExchange    string
	AMQPSource      string
	RelayWarnAge    time.Duration

	Version          bool
	HealthCheck      bool
	CopyTo           string // -copy-to: copy the SQLite catalog at DBPath to this PostgreSQL URL and exit
	Restore          string // -restore or -restore-if-missing: put this backup in place at DBPath and exit
	RestoreIfMissing bool   // only when DBPath does not exist
	RenewLogID       bool   // -renew-log-id: give the database's change log a new identity and exit
}

// configError is an invalid setting; the process exits with status 2.
type configError struct{ msg string }

func (e *configError) Error() string { return e.msg }

// setting is one configuration value, its sources and its parser. usage
// names its value's placeholder in backquotes, as package flag expects:
// "-addr host:port", not "-addr string".
type setting struct {
	env, flag, def, usage string
	set                   func(string) error
}

func (c *config) settings() []setting {
	return []setting{
		{"ADDR", "addr", ":8080", "listen on `host:port` (or :port)", strSetting(&c.Addr, listenAddr)},
		{"DATABASE_URL", "database-url", "", "use the PostgreSQL database at `url`, e.g. postgres://user:pass@host:5432/db?sslmode=require (empty: SQLite at DB_PATH)", strSetting(&c.DatabaseURL, emptyOr(postgresURL))},
		{"DB_PATH", "db", "products.db", "SQLite database `file` (when DATABASE_URL is empty)", strSetting(&c.DBPath, nonEmpty)},
		{"DB_SYNC", "db-sync", "full", "SQLite synchronous `mode`: full (durable on power loss) or normal", strSetting(&c.DBSync, oneOf("full", "normal"))},
		{"DB_TIMEOUT", "db-timeout", "2s", "bound each database query and write batch by `duration`", durSetting(&c.DBTimeout, time.Millisecond)},
		{"REDIS_URL", "redis-url", "", "use the Redis at `url` as the shared cache, e.g. redis://localhost:6379/0 (empty: no Redis)", strSetting(&c.RedisURL, redisURL)},
		{"REDIS_TIMEOUT", "redis-timeout", "100ms", "bound each Redis call by `duration`", durSetting(&c.RedisTimeout, time.Millisecond)},
		{"CACHE_TTL", "cache-ttl", "5m", "keep cached products for `duration`", durSetting(&c.CacheTTL, time.Second)},
		{"LOCAL_CACHE_SIZE", "local-cache-size", "10000", "keep up to `n` products in the in-process cache (0: no in-process caches)", intSetting(&c.LocalCacheSize, 0, 10_000_000)},
		{"CACHE_MEMORY", "cache-memory", "32MiB", "let the in-process product and page caches hold `size` bytes together, e.g. 64MiB (0: no in-process caches)", byteSetting(&c.CacheMemory, 1<<40)},
		{"API_TOKEN", "api-token", "", "accept these comma-separated bearer `tokens` for writes (empty: one is generated and logged)", func(s string) error {
			c.APITokens = nil
			for _, t := range strings.Split(s, ",") {
				if t = strings.TrimSpace(t); t != "" {
					c.APITokens = append(c.APITokens, t)
				}
			}
			if s != "" && len(c.APITokens) == 0 {
				return errors.New("must list at least one non-empty token")
			}
			return nil
		}},
		{"API_TOKENS_FILE", "api-tokens-file", "", "accept the named, scoped credentials listed in `file`, one a line: name scope[,scope...] sha256:<hex digest of the token> [max_held=N]; re-read on SIGHUP and when it changes", strSetting(&c.APITokensFile, func(string) error { return nil })},
		{"TRUSTED_PROXIES", "trusted-proxies", "", "believe X-Forwarded-For only from peers in these comma-separated `CIDRs` (empty: never; the TCP peer is the client)", func(s string) error {
			tp, err := parseTrustedProxies(s)
			c.TrustedProxies = tp
			return err
		}},
		{"JWT_ISSUER", "jwt-issuer", "", "accept OAuth 2 access tokens (JWT, RFC 9068) whose iss is `issuer` (with JWT_AUDIENCE and JWT_JWKS_URL)", strSetting(&c.JWTIssuer, func(string) error { return nil })},
		{"JWT_AUDIENCE", "jwt-audience", "", "accept access tokens whose aud names `audience`", strSetting(&c.JWTAudience, func(string) error { return nil })},
		{"JWT_JWKS_URL", "jwt-jwks-url", "", "verify access tokens with the keys published at `url` (https, or http on loopback)", strSetting(&c.JWTJWKSURL, emptyOr(jwksURL))},
		{"JWT_MAX_HELD", "jwt-max-held", "0", "let an access token without a max_held claim hold at most `n` units in open reservations (0: no cap)", intSetting(&c.JWTMaxHeld, 0, maxStock)},
		{"LOG_LEVEL", "log-level", "info", "log at `level` debug, info, warn or error", func(s string) error {
			// slog also reads "INFO+2" and upper case; the documented
			// values are these four, and an error lists them.
			if err := oneOf("debug", "info", "warn", "error")(s); err != nil {
				return err
			}
			return c.LogLevel.UnmarshalText([]byte(s))
		}},
		{"SHUTDOWN_DELAY", "shutdown-delay", "0s", "after a shutdown signal, keep serving for `duration` with /ready failing", durSetting(&c.ShutdownDelay, 0)},
		{"SHUTDOWN_TIMEOUT", "shutdown-timeout", "25s", "after the delay, wait up to `duration` for in-flight requests to finish", durSetting(&c.ShutdownTimeout, time.Millisecond)},
		{"METRICS_ADDR", "metrics-addr", "", "serve /metrics on `host:port` of its own (empty: on the main listener)", strSetting(&c.MetricsAddr, hostPort)},
		{"ADMIN_ADDR", "admin-addr", "", "serve pprof and /metrics on loopback `host:port` (empty: off)", strSetting(&c.AdminAddr, loopbackHostPort)},
		{"RATE_LIMIT_RPS", "rate-limit-rps", "0", "allow each client `rps` requests per second (0: no limit)", func(s string) error {
			v, err := strconv.ParseFloat(s, 64)
			if err != nil || v < 0 || v > 1e6 || v != v {
				return errors.New("must be a number from 0 to 1000000")
			}
			c.RateLimitRPS = v
			return nil
		}},
		{"RATE_LIMIT_BURST", "rate-limit-burst", "0", "allow each client bursts of `n` requests (0: the rate, rounded up)", intSetting(&c.RateLimitBurst, 0, 1_000_000)},
		{"MAX_IN_FLIGHT", "max-in-flight", strconv.Itoa(256 * runtime.GOMAXPROCS(0)), "serve `n` requests at once; shed more with 503 (0: no limit)", intSetting(&c.MaxInFlight, 0, 1_000_000)},
		{"EVENTS_RETENTION", "events-retention", "168h", "keep change-feed events for `duration` (older ones are trimmed; a consumer further behind gets 410)", durRange(&c.EventsRetention, time.Minute, 90*24*time.Hour)},
		{"FEED_MAX_STREAMS", "feed-max-streams", strconv.Itoa(defaultFeedStreams), "serve `n` change-feed streams (Server-Sent Events) at once; more get 503", intSetting(&c.FeedMaxStreams, 1, 10_000)},
		{"MAX_CONNS", "max-conns", strconv.Itoa(defaultMaxConns()), "hold `n` TCP connections on the API listener at once, closing more unanswered and idle ones above 80% (0: no limit; default: the open-file limit less a tenth)", intSetting(&c.MaxConns, 0, 10_000_000)},
		{"BACKUP_DIR", "backup-dir", "", "keep SQLite backups in `dir` (empty: a backups directory beside DB_PATH)", strSetting(&c.BackupDir, func(s string) error {
			if fi, err := os.Stat(s); s != "" && err == nil && !fi.IsDir() {
				return errors.New("must be a directory (it is made if missing), not a file")
			}
			return nil
		})},
		{"BACKUP_INTERVAL", "backup-interval", "0", "take a SQLite backup every `duration` (0: only when asked, POST /admin/backups)", func(s string) error {
			if s == "0" {
				c.BackupInterval = 0
				return nil
			}
			return durRange(&c.BackupInterval, time.Minute, 30*24*time.Hour)(s)
		}},
		{"BACKUP_KEEP", "backup-keep", "7", "keep the newest `n` backups, deleting older ones after each new one (0: keep all)", intSetting(&c.BackupKeep, 0, 100_000)},
		{"AMQP_URL", "amqp-url", "", "publish the change feed to the RabbitMQ at `url`, e.g. amqp://user:pass@host:5672/ (empty: no relay)", strSetting(&c.AMQPURL, emptyOr(amqpURL))},
		{"AMQP_EXCHANGE", "amqp-exchange", "products", "publish to the durable topic exchange `name` (declared at start)", strSetting(&c.AMQPExchange, nonEmpty)},
		{"AMQP_SOURCE", "amqp-source", "/productsvc", "the CloudEvents `source` of published events", strSetting(&c.AMQPSource, nonEmpty)},
		{"RELAY_WARN_AGE", "relay-warn-age", "5m", "log a warning while the oldest unpublished event is older than `duration`", durSetting(&c.RelayWarnAge, time.Second)},
		{"MAX_CONNS_PER_IP", "max-conns-per-ip", strconv.Itoa(defaultMaxConnsPerAddr), "hold `n` TCP connections on the API listener from one client address (IPv6: one /64) (0: no limit)", intSetting(&c.MaxConnsPerIP, 0, 10_000_000)},
	}
}

func strSetting(dst *string, check func(string) error) func(string) error {
	return func(s string) error {
		if err := check(s); err != nil {
			return err
		}
		*dst = s
		return nil
	}
}

func durSetting(dst *time.Duration, min time.Duration) func(string) error {
	return durRange(dst, min, 24*time.Hour)
}

// durExamples are the durations an error may suggest: durRange names the
// first two its range accepts, so an example is never itself refused.
var durExamples = []time.Duration{250 * time.Millisecond, 5 * time.Second, 10 * time.Minute, 168 * time.Hour}

func durRange(dst *time.Duration, min, max time.Duration) func(string) error {
	var examples []string
	for _, d := range durExamples {
		if d >= min && d <= max && len(examples) < 2 {
			examples = append(examples, shortDuration(d))
		}
	}
	return func(s string) error {
		d, err := time.ParseDuration(s)
		if err != nil || d < min || d > max {
			return fmt.Errorf("must be a duration such as %s, from %s to %s", strings.Join(examples, " or "), shortDuration(min), shortDuration(max))
		}
		*dst = d
		return nil
	}
}

// shortDuration writes d as a person would: "24h", "10m", not "24h0m0s".
func shortDuration(d time.Duration) string {
	s := d.String()
	if strings.HasSuffix(s, "m0s") {
		s = s[:len(s)-2]
	}
	if strings.HasSuffix(s, "h0m") {
		s = s[:len(s)-2]
	}
	return s
}

func intSetting(dst *int, min, max int) func(string) error {
	return func(s string) error {
		n, err := strconv.Atoi(s)
		if err != nil || n < min || n > max {
			return fmt.Errorf("must be an integer from %d to %d", min, max)
		}
		*dst = n
		return nil
	}
}

// byteSetting parses a size in bytes with an optional unit: B, KiB, MiB,
// GiB (powers of 1024) or KB, MB, GB (powers of 1000).
func byteSetting(dst *int, max int64) func(string) error {
	units := []struct {
		suffix string
		mult   int64
	}{{"KiB", 1 << 10}, {"MiB", 1 << 20}, {"GiB", 1 << 30}, {"KB", 1e3}, {"MB", 1e6}, {"GB", 1e9}, {"B", 1}}
	return func(s string) error {
		num, mult := strings.TrimSpace(s), int64(1)
		for _, u := range units {
			if n, ok := strings.CutSuffix(num, u.suffix); ok {
				num, mult = strings.TrimSpace(n), u.mult
				break
			}
		}
		n, err := strconv.ParseInt(num, 10, 64)
		if err != nil || n < 0 || n > max/mult {
			return fmt.Errorf("must be a size such as 32MiB or 500MB, from 0 to %dGiB", max>>30)
		}
		*dst = int(n * mult)
		return nil
	}
}

func nonEmpty(s string) error {
	if s == "" {
		return errors.New("must not be empty")
	}
	return nil
}

func oneOf(choices ...string) func(string) error {
	return func(s string) error {
		for _, c := range choices {
			if s == c {
				return nil
			}
		}
		return fmt.Errorf("must be one of %s", strings.Join(choices, ", "))
	}
}

// listenAddr accepts host:port or :port with a numeric port, as net.Listen
// would, so a bad ADDR fails here, before anything is opened or created.
func listenAddr(s string) error {
	_, port, err := net.SplitHostPort(s)
	if err != nil {
		return errors.New("must be host:port or :port, such as :8080")
	}
	if n, err := strconv.Atoi(port); err != nil || n < 0 || n > 65535 {
		return errors.New("must have a port from 0 to 65535, such as :8080")
	}
	return nil
}

// hostPort is listenAddr for an optional listener: empty turns it off.
func hostPort(s string) error {
	if s == "" {
		return nil
	}
	return listenAddr(s)
}

// loopbackHostPort accepts only loopback addresses: the admin listener
// serves pprof, which must never be reachable from outside the host.
func loopbackHostPort(s string) error {
	if s == "" {
		return nil
	}
	host, _, _ := net.SplitHostPort(s)
	if ip := net.ParseIP(host); listenAddr(s) != nil || host != "localhost" && (ip == nil || !ip.IsLoopback()) {
		return errors.New("must be a loopback host:port such as 127.0.0.1:6060")
	}
	return nil
}

// amqpURL accepts an amqp:// or amqps:// URL with a host.
func amqpURL(s string) error {
	u, err := url.Parse(s)
	if err != nil || (u.Scheme != "amqp" && u.Scheme != "amqps") || u.Host == "" {
		return errors.New("must be an amqp:// or amqps:// URL with a host, such as amqp://user:pass@localhost:5672/")
	}
	return nil
}

// emptyOr accepts the empty string (the setting is off) or what check accepts.
func emptyOr(check func(string) error) func(string) error {
	return func(s string) error {
		if s == "" {
			return nil
		}
		return check(s)
	}
}

func redisURL(s string) error {
	if s == "" {
		return nil
	}
	u, err := url.Parse(s)
	if err != nil || (u.Scheme != "redis" && u.Scheme != "rediss") || u.Host == "" {
		return errors.New("must be a URL such as redis://localhost:6379/0")
	}
	// What go-redis itself refuses (a bad database number, an unknown
	// option) must fail here too, not after the database is opened.
	if _, err := redis.ParseURL(s); err != nil {
		return errors.New("must be a URL such as redis://localhost:6379/0: " + strings.TrimPrefix(err.Error(), "redis: "))
	}
	return nil
}

// backupDir is BACKUP_DIR, or a backups directory beside DB_PATH.
func (c *config) backupDir() string {
	if c.BackupDir != "" {
		return c.BackupDir
	}
	return filepath.Join(filepath.Dir(c.DBPath), "backups")
}

// usageHead comes before the flags in -h's usage.
const usageHead = `Usage: productsvc [flags]

productsvc serves the product catalog over HTTP. Every setting is a flag or
the environment variable named in its line; a flag wins. An invalid value
stops it before it opens anything, with exit status 2. See README.md.

`

// parseConfig reads flags from args and the environment through getenv.
// -h (or -help) writes the usage to stdout and returns flag.ErrHelp: it was
// asked for, so it goes with normal output and is not an error.
func parseConfig(args []string, getenv func(string) string, stdout io.Writer) (*config, error) {
	c := &config{}
	fs := flag.NewFlagSet(args[0], flag.ContinueOnError)
	// Quiet while parsing: a bad flag is one line on stderr, from main,
	// like any other invalid setting, not that line and the whole usage.
	fs.SetOutput(io.Discard)
	fs.Usage = func() {}
	settings := c.settings()
	flagVals := make(map[string]*string, len(settings))
	for _, s := range settings {
		flagVals[s.flag] = fs.String(s.flag, s.def, s.usage+" (env "+s.env+")")
	}
	fs.BoolVar(&c.Version, "version", false, "print the version and exit")
	fs.BoolVar(&c.HealthCheck, "healthcheck", false, "GET this service's /health and exit 0 if it answers 200, else 1")
	var restoreIfMissing string
	fs.StringVar(&c.Restore, "restore", "", "restore the SQLite backup `file` to DB_PATH (the service must be stopped), then exit")
	fs.StringVar(&restoreIfMissing, "restore-if-missing", "", "restore the SQLite backup `file` to DB_PATH only if DB_PATH does not exist, then exit (a Kubernetes initContainer)")
	fs.BoolVar(&c.RenewLogID, "renew-log-id", false, "give the database's change log a new log_id (after a PostgreSQL restore), then exit")
	fs.StringVar(&c.CopyTo, "copy-to", "", "copy the SQLite catalog at DB_PATH to the PostgreSQL database at `url`, then exit (safe to re-run)")
	if err := fs.Parse(args[1:]); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			io.WriteString(stdout, usageHead)
			fs.SetOutput(stdout)
			fs.PrintDefaults()
			return nil, err
		}
		return nil, &configError{msg: err.Error() + " (productsvc -h lists the flags)"}
	}
	if fs.NArg() > 0 {
		return nil, &configError{msg: fmt.Sprintf("unexpected argument %q", fs.Arg(0))}
	}
	if restoreIfMissing != "" {
		if c.Restore != "" {
			return nil, &configError{msg: "give -restore or -restore-if-missing, not both"}
		}
		c.Restore, c.RestoreIfMissing = restoreIfMissing, true
	}
	if n := btoi(c.Restore != "") + btoi(c.RenewLogID) + btoi(c.CopyTo != ""); n > 1 {
		return nil, &configError{msg: "-restore, -renew-log-id and -copy-to each run alone; give one"}
	}
	if c.CopyTo != "" {
		if err := postgresURL(c.CopyTo); err != nil {
			return nil, &configError{msg: fmt.Sprintf("invalid -copy-to %q: %v", redactURL(c.CopyTo), err)}
		}
	}
	given := make(map[string]bool)
	fs.Visit(func(f *flag.Flag) { given[f.Name] = true })
	for _, s := range settings {
		v, source := s.def, "default"
		if given[s.flag] {
			v, source = *flagVals[s.flag], "-"+s.flag
		} else if e := getenv(s.env); e != "" {
			v, source = e, s.env
		}
		if err := s.set(v); err != nil {
			name := s.env
			if source == "-"+s.flag {
				name = source
			}
			shown := v
			switch s.env {
			case "API_TOKEN":
				shown = "[redacted]"
			case "DATABASE_URL", "REDIS_URL", "AMQP_URL":
				shown = redactURL(v)
			}
			return nil, &configError{msg: fmt.Sprintf("invalid %s %q: %v", name, shown, err)}
		}
	}
	if c.Restore != "" && c.DatabaseURL != "" {
		return nil, &configError{msg: "-restore writes DB_PATH, a SQLite database; unset DATABASE_URL (a PostgreSQL database is restored with pg_restore, then -renew-log-id)"}
	}
	if n := countSet(c.JWTIssuer, c.JWTAudience, c.JWTJWKSURL); n != 0 && n != 3 {
		return nil, &configError{msg: "JWT_ISSUER, JWT_AUDIENCE and JWT_JWKS_URL must be set together, or none of them"}
	}
	return c, nil
}

func btoi(b bool) int {
	if b {
		return 1
	}
	return 0
}

func countSet(vals ...string) int {
	n := 0
	for _, v := range vals {
		if v != "" {
			n++
		}
	}
	return n
}

// jwksURL accepts an https URL, or http to a loopback host (a local
// identity provider, a test).
func jwksURL(s string) error {
	u, err := url.Parse(s)
	if err != nil || u.Host == "" || (u.Scheme != "https" && !(u.Scheme == "http" && isLoopbackHost(u.Hostname()))) {
		return errors.New("must be an https URL such as https://idp.example.com/.well-known/jwks.json")
	}
	return nil
}

func isLoopbackHost(h string) bool {
	if h == "localhost" {
		return true
	}
	ip := net.ParseIP(h)
	return ip != nil && ip.IsLoopback()
}

// logAttrs describes the effective configuration, secrets redacted.
func (c *config) logAttrs() []any {
	redis := c.RedisURL
	if u, err := url.Parse(redis); err == nil && redis != "" {
		redis = u.Redacted()
	}
	backend := "sqlite"
	if c.DatabaseURL != "" {
		backend = "postgres"
	}
	return []any{
		"addr", c.Addr, "backend", backend, "database_url", redactURL(c.DatabaseURL), "db_path", c.DBPath, "db_sync", c.DBSync, "db_timeout", c.DBTimeout.String(),
		"redis_url", redis, "redis_timeout", c.RedisTimeout.String(), "cache_ttl", c.CacheTTL.String(),
		"local_cache_size", c.LocalCacheSize, "cache_memory", c.CacheMemory, "api_tokens", len(c.APITokens), "api_tokens_file", c.APITokensFile, "trusted_proxies", len(c.TrustedProxies), "jwt_issuer", c.JWTIssuer, "jwt_audience", c.JWTAudience, "jwt_jwks_url", c.JWTJWKSURL, "jwt_max_held", c.JWTMaxHeld, "log_level", c.LogLevel.String(),
		"shutdown_delay", c.ShutdownDelay.String(), "shutdown_timeout", c.ShutdownTimeout.String(),
		"metrics_addr", c.MetricsAddr, "admin_addr", c.AdminAddr,
		"rate_limit_rps", c.RateLimitRPS, "rate_limit_burst", c.RateLimitBurst, "max_in_flight", c.MaxInFlight,
		"max_conns", c.MaxConns, "max_conns_per_ip", c.MaxConnsPerIP,
		"backup_dir", c.backupDir(), "backup_interval", c.BackupInterval.String(), "backup_keep", c.BackupKeep,
		"amqp_url", redactURL(c.AMQPURL), "amqp_exchange", c.AMQPExchange,
	}
}
