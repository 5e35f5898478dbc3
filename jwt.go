package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/lestrrat-go/jwx/v3/jwk"
	"github.com/lestrrat-go/jwx/v3/jws"
	"github.com/lestrrat-go/jwx/v3/jwt"
)

// jwtVerifier accepts OAuth 2 access tokens in JWT form (RFC 9068) from
// one issuer, for one audience, signed by a key of the issuer's JWKS. It
// owns the cached key set: fetched at start, and fetched again when a
// token names a key id the set does not have — at most once per
// minRefresh, so tokens with invented key ids cannot make it hammer the
// issuer. A failed fetch keeps the keys it has.
type jwtVerifier struct {
	issuer, audience, jwksURL string
	maxHeld                   int64 // cap for tokens without a max_held claim (0: none)
	skew                      time.Duration
	minRefresh                time.Duration
	client                    *http.Client
	log                       *slog.Logger
	now                       func() time.Time

	keys      atomic.Pointer[jwk.Set] // nil until a fetch succeeds
	fetchMu   sync.Mutex              // one fetch at a time
	lastFetch time.Time               // under fetchMu
}

// jwtAlgorithms are the signature algorithms accepted: asymmetric only, so
// neither "none" nor an HMAC keyed with a public key can pass.
var jwtAlgorithms = map[string]bool{"RS256": true, "ES256": true, "EdDSA": true}

const (
	jwtSkew        = 30 * time.Second // allowed clock difference for exp, nbf, iat
	jwksMinRefresh = 30 * time.Second // at most one JWKS fetch per this, on unknown key ids
	jwksTimeout    = 5 * time.Second
	maxJWKSBytes   = 1 << 20
	maxJWTBytes    = 16 << 10
	maxActorLen    = 255
)

func newJWTVerifier(issuer, audience, jwksURL string, maxHeld int64, log *slog.Logger) *jwtVerifier {
	return &jwtVerifier{
		issuer: issuer, audience: audience, jwksURL: jwksURL, maxHeld: maxHeld,
		skew: jwtSkew, minRefresh: jwksMinRefresh,
		client: &http.Client{Timeout: jwksTimeout},
		log:    log, now: time.Now,
	}
}

// refresh fetches the key set, unless one was fetched (or tried) less
// than minRefresh ago. It keeps the keys it has when the fetch fails.
func (v *jwtVerifier) refresh(ctx context.Context) {
	v.fetchMu.Lock()
	defer v.fetchMu.Unlock()
	if !v.lastFetch.IsZero() && v.now().Sub(v.lastFetch) < v.minRefresh {
		return
	}
	v.lastFetch = v.now()
	set, err := v.fetch(ctx)
	if err != nil {
		v.log.Warn("JWKS fetch failed; verifying with the keys already held", "url", v.jwksURL, "err", err.Error())
		return
	}
	v.keys.Store(&set)
	v.log.Info("JWKS fetched", "url", v.jwksURL, "keys", set.Len())
}

func (v *jwtVerifier) fetch(ctx context.Context) (jwk.Set, error) {
	ctx, cancel := context.WithTimeout(ctx, jwksTimeout)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, v.jwksURL, nil)
	if err != nil {
		return nil, err
	}
	req.Header.Set("Accept", "application/json")
	resp, err := v.client.Do(req)
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return nil, fmt.Errorf("status %d", resp.StatusCode)
	}
	b, err := io.ReadAll(io.LimitReader(resp.Body, maxJWKSBytes+1))
	if err != nil {
		return nil, err
	}
	if len(b) > maxJWKSBytes {
		return nil, errors.New("larger than 1 MiB")
	}
	return jwk.Parse(b)
}

// errJWT is any token the verifier refuses; the cause is not told to the
// client (401 invalid_token says enough).
var errJWT = errors.New("invalid access token")

// verify returns the principal of an access token: its sub (else
// client_id) as the name, its scope (space-separated) or scp claim as the
// scopes, and its max_held claim (else the setting) as the hold cap.
func (v *jwtVerifier) verify(ctx context.Context, token string) (principal, error) {
	if len(token) > maxJWTBytes {
		return principal{}, errJWT
	}
	msg, err := jws.Parse([]byte(token), jws.WithCompact())
	if err != nil || len(msg.Signatures()) != 1 {
		return principal{}, errJWT
	}
	h := msg.Signatures()[0].ProtectedHeaders()
	alg, ok := h.Algorithm()
	if !ok || !jwtAlgorithms[alg.String()] {
		return principal{}, errJWT
	}
	kid, ok := h.KeyID()
	if !ok || kid == "" {
		return principal{}, errJWT
	}
	keys := v.keys.Load()
	if keys == nil || !hasKey(*keys, kid) {
		v.refresh(ctx)
		if keys = v.keys.Load(); keys == nil {
			return principal{}, errJWT
		}
	}
	tok, err := jwt.Parse([]byte(token),
		jwt.WithKeySet(*keys, jws.WithInferAlgorithmFromKey(true), jws.WithRequireKid(true)),
		jwt.WithValidate(true),
		jwt.WithIssuer(v.issuer),
		jwt.WithAudience(v.audience),
		jwt.WithAcceptableSkew(v.skew),
		jwt.WithClock(jwt.ClockFunc(v.now)),
		jwt.WithRequiredClaim("exp"),
	)
	if err != nil {
		return principal{}, errJWT
	}
	p := principal{MaxHeld: v.maxHeld}
	if sub, ok := tok.Subject(); ok && sub != "" {
		p.Name = sub
	} else {
		var clientID string
		if tok.Get("client_id", &clientID) == nil {
			p.Name = clientID
		}
	}
	if p.Name == "" || len(p.Name) > maxActorLen {
		return principal{}, errJWT
	}
	p.Scopes = jwtScopes(tok)
	var capClaim float64
	if tok.Get("max_held", &capClaim) == nil && capClaim >= 1 && capClaim <= maxStock && capClaim == float64(int64(capClaim)) {
		p.MaxHeld = int64(capClaim)
	}
	p.key = "jwt:" + p.Name
	return p, nil
}

func hasKey(set jwk.Set, kid string) bool {
	_, ok := set.LookupKeyID(kid)
	return ok
}

// jwtScopes reads the scopes of a token: "scope", a space-separated string
// (RFC 9068), else "scp", a list or a string. Unknown names are ignored.
func jwtScopes(tok jwt.Token) scope {
	var names []string
	var s string
	var list []any
	switch {
	case tok.Get("scope", &s) == nil:
		names = strings.Fields(s)
	case tok.Get("scp", &list) == nil:
		for _, n := range list {
			if n, ok := n.(string); ok {
				names = append(names, n)
			}
		}
	case tok.Get("scp", &s) == nil:
		names = strings.Fields(s)
	}
	var out scope
	for _, n := range names {
		if sc, ok := scopeNamed(n); ok {
			out |= sc
		}
	}
	return out
}

// looksLikeJWT reports whether a bearer token has a JWT's three parts.
func looksLikeJWT(tok string) bool { return strings.Count(tok, ".") == 2 }
