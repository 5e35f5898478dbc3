package main

import (
	"bufio"
	"context"
	"crypto/sha256"
	"crypto/subtle"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"os"
	"strconv"
	"strings"
	"sync/atomic"
	"time"
)

// scope is a set of permissions, one bit each. A credential holds a set; a
// route needs one.
type scope uint8

const (
	scopeCatalogWrite      scope = 1 << iota // POST, PUT, PATCH, DELETE of products
	scopeStockWrite                          // stock set and adjustments
	scopeReservationsWrite                   // create, confirm, release reservations
	scopeReservationsRead                    // GET reservations
	scopeEventsRead                          // the change feed, JSON and SSE
	scopeAdmin                               // everything, and the administrative endpoints

	scopeAll = scopeCatalogWrite | scopeStockWrite | scopeReservationsWrite | scopeReservationsRead | scopeEventsRead | scopeAdmin
)

// scopeNames names each scope as credentials and tokens spell it.
var scopeNames = []struct {
	s    scope
	name string
}{
	{scopeCatalogWrite, "catalog:write"},
	{scopeStockWrite, "stock:write"},
	{scopeReservationsWrite, "reservations:write"},
	{scopeReservationsRead, "reservations:read"},
	{scopeEventsRead, "events:read"},
	{scopeAdmin, "admin"},
}

// String names the scopes of s, separated by spaces (as OAuth 2 does).
func (s scope) String() string {
	var names []string
	for _, n := range scopeNames {
		if s&n.s != 0 {
			names = append(names, n.name)
		}
	}
	return strings.Join(names, " ")
}

// allows reports whether a holder of s may do what needs need: admin
// allows everything.
func (s scope) allows(need scope) bool {
	return s&scopeAdmin != 0 || s&need == need
}

// scopeNamed returns the scope called name, if there is one.
func scopeNamed(name string) (scope, bool) {
	for _, n := range scopeNames {
		if n.name == name {
			return n.s, true
		}
	}
	return 0, false
}

// principal is who a request authenticated as. Name is the actor recorded
// for what the request does; it is never the token.
type principal struct {
	Name   string
	Scopes scope
	// MaxHeld caps the units the credential may hold in open reservations
	// (0: no cap).
	MaxHeld int64
	// key identifies the credential to the rate limiter: a prefix of its
	// digest, so two credentials with one name are still two clients.
	key string
}

// credential is one accepted bearer token, held as its SHA-256 digest.
type credential struct {
	principal
	digest [sha256.Size]byte
}

// tokenSet owns the accepted credentials: those of API_TOKEN, fixed at
// start, and those of API_TOKENS_FILE, which a reload replaces whole. A
// request sees one set or the other, never a mix.
type tokenSet struct {
	static []credential
	creds  atomic.Pointer[[]credential]

	// file is API_TOKENS_FILE ("" without one); loaded is the modification
	// time and size of what was last read, to notice a change.
	file   string
	loaded atomic.Pointer[fileStamp]

	// jwt verifies OAuth 2 access tokens (JWT_ISSUER); nil: none accepted.
	// Set before serving.
	jwt *jwtVerifier
}

type fileStamp struct {
	mod  time.Time
	size int64
}

// apiTokenName is the name of the credentials of API_TOKEN.
const apiTokenName = "api-token"

// newTokenSet returns a set that accepts each of tokens (API_TOKEN) as a
// credential named api-token with every scope.
func newTokenSet(tokens []string) *tokenSet {
	ts := &tokenSet{}
	for _, t := range tokens {
		if t = strings.TrimSpace(t); t != "" {
			sum := sha256.Sum256([]byte(t))
			ts.static = append(ts.static, credential{
				principal: principal{Name: apiTokenName, Scopes: scopeAll, key: hex.EncodeToString(sum[:8])},
				digest:    sum,
			})
		}
	}
	all := ts.static
	ts.creds.Store(&all)
	return ts
}

// len returns the number of accepted credentials.
func (ts *tokenSet) len() int { return len(*ts.creds.Load()) }

// match returns the principal of the request's bearer token, if the token
// is one of the set's. Every digest is compared, in constant time, whatever
// the outcome.
//
// An access token (JWT) is verified when no static credential matches. The
// outcome is kept for the request, so the rate limiter and requireScope
// verify a signature once between them.
func (ts *tokenSet) match(r *http.Request) (principal, bool) {
	info := infoFrom(r.Context())
	if info != nil && info.auth != nil {
		return info.auth.p, info.auth.ok
	}
	p, ok := ts.authenticate(r)
	if info != nil {
		info.auth = &authOutcome{p, ok}
	}
	return p, ok
}

// authOutcome is a request's authentication, once done.
type authOutcome struct {
	p  principal
	ok bool
}

func (ts *tokenSet) authenticate(r *http.Request) (principal, bool) {
	tok, ok := bearerToken(r)
	if !ok {
		return principal{}, false
	}
	sum := sha256.Sum256([]byte(tok))
	found := -1
	creds := *ts.creds.Load()
	for i := range creds {
		if subtle.ConstantTimeCompare(sum[:], creds[i].digest[:]) == 1 {
			found = i
		}
	}
	if found < 0 {
		if ts.jwt != nil && looksLikeJWT(tok) {
			p, err := ts.jwt.verify(r.Context(), tok)
			return p, err == nil
		}
		return principal{}, false
	}
	return creds[found].principal, true
}

// bearerToken returns the token of the request's Authorization header.
func bearerToken(r *http.Request) (string, bool) {
	scheme, tok, ok := strings.Cut(r.Header.Get("Authorization"), " ")
	tok = strings.TrimSpace(tok)
	if !ok || !strings.EqualFold(scheme, "Bearer") || tok == "" {
		return "", false
	}
	return tok, true
}

// loadFile reads path, API_TOKENS_FILE, and makes its credentials (with
// those of API_TOKEN) the accepted set. A file that does not parse leaves
// the set as it was; the error names the line, never a digest.
func (ts *tokenSet) loadFile(path string) error {
	f, err := os.Open(path)
	if err != nil {
		return fmt.Errorf("read API_TOKENS_FILE: %w", err)
	}
	defer f.Close()
	st, err := f.Stat()
	if err != nil {
		return fmt.Errorf("read API_TOKENS_FILE: %w", err)
	}
	creds, err := parseTokensFile(f)
	if err != nil {
		return fmt.Errorf("API_TOKENS_FILE %s: %w", path, err)
	}
	for _, s := range ts.static {
		for _, c := range creds {
			if c.digest == s.digest {
				return fmt.Errorf("API_TOKENS_FILE %s: credential %q has the token of API_TOKEN", path, c.Name)
			}
		}
	}
	all := append(append(make([]credential, 0, len(ts.static)+len(creds)), ts.static...), creds...)
	ts.creds.Store(&all)
	ts.loaded.Store(&fileStamp{mod: st.ModTime(), size: st.Size()})
	return nil
}

// useFile makes path API_TOKENS_FILE and loads it: what reload and watch
// read again. Call it before watch starts.
func (ts *tokenSet) useFile(path string) error {
	ts.file = path
	return ts.loadFile(path)
}

// reload reads the tokens file again and logs the outcome: how many
// credentials it holds, or why it was refused (the previous set stays).
func (ts *tokenSet) reload(log *slog.Logger, why string) {
	if ts.file == "" {
		return
	}
	if err := ts.loadFile(ts.file); err != nil {
		log.Error("tokens file not reloaded; the previous credentials stay", "why", why, "err", err.Error())
		return
	}
	log.Info("tokens file reloaded", "why", why, "credentials", ts.len())
}

// changed reports whether the tokens file's modification time or size
// differs from what was last loaded.
func (ts *tokenSet) changed() bool {
	st, err := os.Stat(ts.file)
	if err != nil {
		return false // a file being replaced; the next look or SIGHUP tells
	}
	last := ts.loaded.Load()
	return last == nil || !st.ModTime().Equal(last.mod) || st.Size() != last.size
}

// watch reloads the tokens file on each value from hup (SIGHUP) and when
// its modification time or size changes, looked at every interval, until
// ctx ends. Without a file it only drains hup.
func (ts *tokenSet) watch(ctx context.Context, hup <-chan os.Signal, interval time.Duration, log *slog.Logger) {
	tick := time.NewTicker(interval)
	defer tick.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-hup:
			ts.reload(log, "SIGHUP")
		case <-tick.C:
			if ts.file != "" && ts.changed() {
				ts.reload(log, "file changed")
			}
		}
	}
}

// tokensFileFormat describes a line of API_TOKENS_FILE, for errors.
const tokensFileFormat = "name scope[,scope...] sha256:<64 hex digits> [max_held=N]"

// parseTokensFile parses API_TOKENS_FILE: one credential a line,
//
//	name scope[,scope...] sha256:<hex digest of the token> [max_held=N]
//
// with blank lines and lines starting with # ignored. Names are 1 to 64 of
// A-Z a-z 0-9 . _ - @ and unique; so are digests. The error names the line
// and what is wrong with it, never the digest.
func parseTokensFile(r io.Reader) ([]credential, error) {
	var creds []credential
	names := map[string]int{}
	digests := map[[sha256.Size]byte]int{}
	sc := bufio.NewScanner(r)
	line := 0
	for sc.Scan() {
		line++
		text := strings.TrimSpace(sc.Text())
		if text == "" || strings.HasPrefix(text, "#") {
			continue
		}
		c, err := parseCredentialLine(text)
		if err != nil {
			return nil, fmt.Errorf("line %d: %w (want %s)", line, err, tokensFileFormat)
		}
		if prev, ok := names[c.Name]; ok {
			return nil, fmt.Errorf("line %d: name %q is already used on line %d", line, c.Name, prev)
		}
		if prev, ok := digests[c.digest]; ok {
			return nil, fmt.Errorf("line %d: the digest is already used on line %d", line, prev)
		}
		names[c.Name], digests[c.digest] = line, line
		creds = append(creds, c)
	}
	if err := sc.Err(); err != nil {
		return nil, fmt.Errorf("after line %d: %w", line, err)
	}
	return creds, nil
}

func parseCredentialLine(text string) (credential, error) {
	fields := strings.Fields(text)
	if len(fields) < 3 {
		return credential{}, errors.New("too few fields")
	}
	var c credential
	c.Name = fields[0]
	if !validCredentialName(c.Name) {
		return credential{}, errors.New("the name must be 1 to 64 of A-Z a-z 0-9 . _ - @")
	}
	for _, s := range strings.Split(fields[1], ",") {
		sc, ok := scopeNamed(s)
		if !ok {
			return credential{}, fmt.Errorf("unknown scope %q", s)
		}
		c.Scopes |= sc
	}
	hexDigest, ok := strings.CutPrefix(fields[2], "sha256:")
	b, err := hex.DecodeString(hexDigest)
	if !ok || err != nil || len(b) != sha256.Size {
		return credential{}, errors.New("the third field must be sha256: and 64 hex digits")
	}
	copy(c.digest[:], b)
	c.key = hex.EncodeToString(b[:8])
	for _, opt := range fields[3:] {
		k, v, _ := strings.Cut(opt, "=")
		switch k {
		case "max_held":
			n, err := strconv.ParseInt(v, 10, 64)
			if err != nil || n < 1 || n > maxStock {
				return credential{}, fmt.Errorf("max_held must be a whole number from 1 to %d", int64(maxStock))
			}
			c.MaxHeld = n
		default:
			return credential{}, fmt.Errorf("unknown option %q", k)
		}
	}
	return c, nil
}

func validCredentialName(s string) bool {
	if len(s) == 0 || len(s) > 64 {
		return false
	}
	for i := 0; i < len(s); i++ {
		c := s[i]
		if !(c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || c == '-' || c == '_' || c == '.' || c == '@') {
			return false
		}
	}
	return true
}

// scopeError is a request whose credential is valid but lacks the scope
// the route needs: 403 insufficient_scope (RFC 6750 §3.1).
type scopeError struct{ need scope }

func (e *scopeError) Error() string {
	return fmt.Sprintf("this credential lacks the scope %s that this request needs", e.need)
}

type principalKey struct{}

// principalFrom returns who the request authenticated as, if it did.
func principalFrom(ctx context.Context) (principal, bool) {
	p, ok := ctx.Value(principalKey{}).(principal)
	return p, ok
}

// actorFrom returns the name of who the request authenticated as, "" if
// it did not. The actor travels from requireScope to the service in the
// request's context, as the request id does; the service hands it to the
// store as an explicit argument of each write (see productStore).
func actorFrom(ctx context.Context) string {
	p, _ := principalFrom(ctx)
	return p.Name
}

// authorize returns nil if the request authenticated with a credential
// that allows need, a *scopeError if it authenticated without it, and
// errUnauthenticated if it did not authenticate. Code outside addRoutes'
// wrappers (an administrative action, say) asks it: authorize(ctx, scopeAdmin).
func authorize(ctx context.Context, need scope) error {
	p, ok := principalFrom(ctx)
	if !ok {
		return errUnauthenticated
	}
	if !p.Scopes.allows(need) {
		return &scopeError{need: need}
	}
	return nil
}

var errUnauthenticated = &httpError{status: http.StatusUnauthorized, detail: "this request needs an Authorization: Bearer token"}

// requireScope lets a request through only with a valid bearer token
// (else 401) whose credential allows need (else 403). Repeated failures to
// authenticate from one client are limited more tightly than the general
// rate limit, to slow down token guessing; a valid token without the scope
// is not a guess and is not limited so.
func requireScope(ts *tokenSet, limits *rateLimiter, need scope, next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		p, ok := ts.match(r)
		if !ok {
			if limits != nil && !limits.allowAuthFailure(clientKey(r)) {
				markRejected(r.Context())
				writeError(w, r, &rateLimitError{retryAfter: limits.authRetryAfter})
				return
			}
			err, challenge := errUnauthenticated, `Bearer realm="productsvc"`
			if r.Header.Get("Authorization") != "" {
				err = &httpError{status: http.StatusUnauthorized, detail: "the bearer token is not valid"}
				challenge = `Bearer realm="productsvc", error="invalid_token"`
			}
			w.Header().Set("WWW-Authenticate", challenge)
			writeError(w, r, err)
			return
		}
		if info := infoFrom(r.Context()); info != nil {
			info.actor = p.Name
		}
		ctx := context.WithValue(r.Context(), principalKey{}, p)
		if err := authorize(ctx, need); err != nil {
			writeError(w, r, err)
			return
		}
		next.ServeHTTP(w, r.WithContext(ctx))
	})
}

// requireAdmin is requireScope for the administrative endpoints.
func requireAdmin(ts *tokenSet, limits *rateLimiter, next http.Handler) http.Handler {
	return requireScope(ts, limits, scopeAdmin, next)
}
