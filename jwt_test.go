package main

import (
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"crypto/x509"
	"encoding/base64"
	"encoding/json"
	"encoding/pem"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/lestrrat-go/jwx/v3/jwa"
	"github.com/lestrrat-go/jwx/v3/jwk"
	"github.com/lestrrat-go/jwx/v3/jws"
	"github.com/lestrrat-go/jwx/v3/jwt"
	"github.com/prometheus/client_golang/prometheus"
)

const (
	jtIssuer   = "https://idp.example.com/"
	jtAudience = "productsvc"
)

// jtIdP is an identity provider for tests: signing keys, and their public
// JWKS served over real HTTP on 127.0.0.1.
type jtIdP struct {
	srv     *httptest.Server
	keys    map[string]jwk.Key // private, by kid
	served  atomic.Pointer[[]byte]
	down    atomic.Bool
	fetches atomic.Int64
}

func newJTIdP(t *testing.T) *jtIdP {
	t.Helper()
	idp := &jtIdP{keys: map[string]jwk.Key{}}
	rsaKey, err := rsa.GenerateKey(rand.Reader, 2048)
	if err != nil {
		t.Fatal(err)
	}
	ecKey, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	_, edKey, err := ed25519.GenerateKey(rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	idp.add(t, "rsa-1", rsaKey)
	idp.add(t, "ec-1", ecKey)
	idp.add(t, "ed-1", edKey)
	idp.publish(t, "rsa-1", "ec-1", "ed-1")
	idp.srv = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		idp.fetches.Add(1)
		if idp.down.Load() {
			http.Error(w, "down", http.StatusServiceUnavailable)
			return
		}
		w.Header().Set("Content-Type", "application/json")
		w.Write(*idp.served.Load())
	}))
	t.Cleanup(idp.srv.Close)
	return idp
}

func (idp *jtIdP) add(t *testing.T, kid string, raw any) {
	t.Helper()
	k, err := jwk.Import(raw)
	if err != nil {
		t.Fatal(err)
	}
	k.Set(jwk.KeyIDKey, kid)
	idp.keys[kid] = k
}

// publish serves the public keys of kids as the JWKS.
func (idp *jtIdP) publish(t *testing.T, kids ...string) {
	t.Helper()
	set := jwk.NewSet()
	for _, kid := range kids {
		pub, err := idp.keys[kid].PublicKey()
		if err != nil {
			t.Fatal(err)
		}
		set.AddKey(pub)
	}
	b, err := json.Marshal(set)
	if err != nil {
		t.Fatal(err)
	}
	idp.served.Store(&b)
}

// sign returns a token signed by kid's key with alg, with the usual valid
// claims changed by edit.
func (idp *jtIdP) sign(t *testing.T, kid string, alg jwa.SignatureAlgorithm, edit func(jwt.Token)) string {
	t.Helper()
	tok := jwt.New()
	tok.Set(jwt.IssuerKey, jtIssuer)
	tok.Set(jwt.AudienceKey, []string{jtAudience})
	tok.Set(jwt.SubjectKey, "order-service")
	tok.Set(jwt.ExpirationKey, time.Now().Add(5*time.Minute))
	tok.Set(jwt.IssuedAtKey, time.Now())
	tok.Set("scope", "reservations:write events:read")
	if edit != nil {
		edit(tok)
	}
	h := jws.NewHeaders()
	h.Set(jws.KeyIDKey, kid)
	b, err := jwt.Sign(tok, jwt.WithKey(alg, idp.keys[kid], jws.WithProtectedHeaders(h)))
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}

func (idp *jtIdP) verifier() *jwtVerifier {
	v := newJWTVerifier(jtIssuer, jtAudience, idp.srv.URL, 0, slog.New(slog.DiscardHandler))
	v.minRefresh = 0
	return v
}

func TestJWTVerifier_verify(t *testing.T) {
	idp := newJTIdP(t)
	v := idp.verifier()
	b64 := base64.RawURLEncoding.EncodeToString
	claims, _ := json.Marshal(map[string]any{"iss": jtIssuer, "aud": jtAudience, "sub": "x", "exp": time.Now().Add(time.Hour).Unix(), "scope": "admin"})
	pub, _ := idp.keys["rsa-1"].PublicKey()
	var rawPub rsa.PublicKey
	if err := jwk.Export(pub, &rawPub); err != nil {
		t.Fatal(err)
	}
	der, _ := x509.MarshalPKIXPublicKey(&rawPub)
	pubPEM := pem.EncodeToMemory(&pem.Block{Type: "PUBLIC KEY", Bytes: der})
	// HS256 keyed with the RSA public key, as an attacker who has the JWKS
	// could make it.
	hmacToken := func() string {
		tok := jwt.New()
		tok.Set(jwt.IssuerKey, jtIssuer)
		tok.Set(jwt.AudienceKey, []string{jtAudience})
		tok.Set(jwt.SubjectKey, "x")
		tok.Set(jwt.ExpirationKey, time.Now().Add(time.Hour))
		tok.Set("scope", "admin")
		h := jws.NewHeaders()
		h.Set(jws.KeyIDKey, "rsa-1")
		b, err := jwt.Sign(tok, jwt.WithKey(jwa.HS256(), pubPEM, jws.WithProtectedHeaders(h)))
		if err != nil {
			t.Fatal(err)
		}
		return string(b)
	}()
	noneHeader, _ := json.Marshal(map[string]string{"alg": "none", "kid": "rsa-1"})

	other, _ := rsa.GenerateKey(rand.Reader, 2048)
	forger := &jtIdP{keys: map[string]jwk.Key{}}
	forger.add(t, "rsa-1", other)

	tests := []struct {
		name    string
		token   string
		wantErr bool
		want    principal
	}{
		{name: "RS256", token: idp.sign(t, "rsa-1", jwa.RS256(), nil),
			want: principal{Name: "order-service", Scopes: scopeReservationsWrite | scopeEventsRead, key: "jwt:order-service"}},
		{name: "ES256", token: idp.sign(t, "ec-1", jwa.ES256(), nil),
			want: principal{Name: "order-service", Scopes: scopeReservationsWrite | scopeEventsRead, key: "jwt:order-service"}},
		{name: "EdDSA with scp, client_id and max_held", token: idp.sign(t, "ed-1", jwa.EdDSA(), func(tok jwt.Token) {
			tok.Remove(jwt.SubjectKey)
			tok.Remove("scope")
			tok.Set("client_id", "indexer")
			tok.Set("scp", []string{"events:read", "no:such"})
			tok.Set("max_held", 7)
		}), want: principal{Name: "indexer", Scopes: scopeEventsRead, MaxHeld: 7, key: "jwt:indexer"}},
		{name: "expired", wantErr: true, token: idp.sign(t, "rsa-1", jwa.RS256(), func(tok jwt.Token) {
			tok.Set(jwt.ExpirationKey, time.Now().Add(-2*time.Minute))
		})},
		{name: "within the skew", token: idp.sign(t, "rsa-1", jwa.RS256(), func(tok jwt.Token) {
			tok.Set(jwt.ExpirationKey, time.Now().Add(-5*time.Second))
		}), want: principal{Name: "order-service", Scopes: scopeReservationsWrite | scopeEventsRead, key: "jwt:order-service"}},
		{name: "nbf in the future", wantErr: true, token: idp.sign(t, "rsa-1", jwa.RS256(), func(tok jwt.Token) {
			tok.Set(jwt.NotBeforeKey, time.Now().Add(2*time.Minute))
		})},
		{name: "no exp", wantErr: true, token: idp.sign(t, "rsa-1", jwa.RS256(), func(tok jwt.Token) { tok.Remove(jwt.ExpirationKey) })},
		{name: "wrong iss", wantErr: true, token: idp.sign(t, "rsa-1", jwa.RS256(), func(tok jwt.Token) { tok.Set(jwt.IssuerKey, "https://evil.example/") })},
		{name: "wrong aud", wantErr: true, token: idp.sign(t, "rsa-1", jwa.RS256(), func(tok jwt.Token) { tok.Set(jwt.AudienceKey, []string{"other"}) })},
		{name: "no subject", wantErr: true, token: idp.sign(t, "rsa-1", jwa.RS256(), func(tok jwt.Token) { tok.Remove(jwt.SubjectKey) })},
		{name: "bad signature", wantErr: true, token: forger.sign(t, "rsa-1", jwa.RS256(), nil)},
		{name: "alg none", wantErr: true, token: b64(noneHeader) + "." + b64(claims) + "."},
		{name: "HS256 keyed with the RSA public key", wantErr: true, token: hmacToken},
		{name: "RS256 token with its signature cut", wantErr: true, token: strings.TrimRight(idp.sign(t, "rsa-1", jwa.RS256(), nil), "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_")},
		{name: "not a JWT", wantErr: true, token: "a.b.c"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := v.verify(t.Context(), tt.token)
			if tt.wantErr {
				if err == nil {
					t.Fatalf("verify = %+v, nil; want an error", got)
				}
				return
			}
			if err != nil || got != tt.want {
				t.Fatalf("verify = %+v, %v; want %+v", got, err, tt.want)
			}
		})
	}
}

// TestJWTVerifier_keys checks the key set's life: an unknown key id makes
// it fetch the JWKS again (a rotation), at most once per minRefresh; with
// the JWKS endpoint down it keeps verifying with the keys it has (warm),
// and accepts nothing until a fetch succeeds (cold).
func TestJWTVerifier_keys(t *testing.T) {
	t.Run("rotation", func(t *testing.T) {
		idp := newJTIdP(t)
		v := idp.verifier()
		if _, err := v.verify(t.Context(), idp.sign(t, "rsa-1", jwa.RS256(), nil)); err != nil {
			t.Fatalf("before the rotation: %v", err)
		}
		k2, _ := rsa.GenerateKey(rand.Reader, 2048)
		idp.add(t, "rsa-2", k2)
		tok := idp.sign(t, "rsa-2", jwa.RS256(), nil)
		if _, err := v.verify(t.Context(), tok); err == nil {
			t.Fatal("a key the JWKS does not publish yet was accepted")
		}
		idp.publish(t, "rsa-2", "ec-1")
		if _, err := v.verify(t.Context(), tok); err != nil {
			t.Fatalf("after the rotation: %v", err)
		}
	})
	t.Run("refetch is rate limited", func(t *testing.T) {
		idp := newJTIdP(t)
		v := idp.verifier()
		v.minRefresh = time.Hour
		v.refresh(t.Context())
		before := idp.fetches.Load()
		for i := range 20 {
			tok := idp.sign(t, "rsa-1", jwa.RS256(), nil)
			tok = strings.Replace(tok, strings.Split(tok, ".")[0], base64.RawURLEncoding.EncodeToString(
				[]byte(`{"alg":"RS256","kid":"unknown-`+string(rune('a'+i))+`"}`)), 1)
			v.verify(t.Context(), tok)
		}
		if n := idp.fetches.Load() - before; n != 0 {
			t.Errorf("20 tokens with unknown key ids made %d fetches within minRefresh, want 0", n)
		}
	})
	t.Run("down with the cache warm", func(t *testing.T) {
		idp := newJTIdP(t)
		v := idp.verifier()
		v.refresh(t.Context())
		idp.down.Store(true)
		k2, _ := rsa.GenerateKey(rand.Reader, 2048)
		idp.add(t, "rsa-2", k2)
		if _, err := v.verify(t.Context(), idp.sign(t, "rsa-2", jwa.RS256(), nil)); err == nil {
			t.Error("an unknown key was accepted while the JWKS is down")
		}
		if _, err := v.verify(t.Context(), idp.sign(t, "ec-1", jwa.ES256(), nil)); err != nil {
			t.Errorf("a known key while the JWKS is down: %v, want it verified", err)
		}
	})
	t.Run("down with the cache cold", func(t *testing.T) {
		idp := newJTIdP(t)
		idp.down.Store(true)
		v := idp.verifier()
		v.refresh(t.Context())
		tok := idp.sign(t, "rsa-1", jwa.RS256(), nil)
		if _, err := v.verify(t.Context(), tok); err == nil {
			t.Fatal("a token was accepted with no keys")
		}
		idp.down.Store(false)
		if _, err := v.verify(t.Context(), tok); err != nil {
			t.Errorf("once the JWKS is back: %v, want it verified", err)
		}
	})
}

// TestJWT_http checks access tokens through the handler: the scope of the
// token decides 200 or 403, an invalid one is 401, and the actor is the
// token's subject.
func TestJWT_http(t *testing.T) {
	idp := newJTIdP(t)
	ts := newTokenSet(nil)
	ts.jwt = idp.verifier()
	m := newMetrics(prometheus.NewRegistry())
	var logs syncBuffer
	life := &lifecycle{}
	life.started.Store(true)
	h := newServer(serverDeps{svc: NewProductService(newTestStore(t), ServiceConfig{Metrics: m}), log: slog.New(slog.NewJSONHandler(&logs, nil)),
		metrics: m, tokens: ts, life: life, limiter: newRateLimiter(1000, 1000, ts), streams: newStreamSlots(2)})
	send := func(method, target, token string) *httptest.ResponseRecorder {
		req := httptest.NewRequest(method, target, strings.NewReader(`{"sku":"J-1","name":"pen","price_cents":1}`))
		req.Header.Set("Content-Type", "application/json")
		req.Header.Set("Authorization", "Bearer "+token)
		rec := httptest.NewRecorder()
		h.ServeHTTP(rec, req)
		return rec
	}
	tok := idp.sign(t, "rsa-1", jwa.RS256(), nil) // reservations:write events:read
	if rec := send("GET", "/events", tok); rec.Code != http.StatusOK {
		t.Errorf("GET /events with events:read = %d %s, want 200", rec.Code, rec.Body)
	}
	if rec := send("POST", "/products", tok); rec.Code != http.StatusForbidden ||
		!strings.Contains(rec.Header().Get("WWW-Authenticate"), `scope="catalog:write"`) {
		t.Errorf("POST /products without catalog:write = %d (%s), want 403 naming catalog:write", rec.Code, rec.Header().Get("WWW-Authenticate"))
	}
	expired := idp.sign(t, "rsa-1", jwa.RS256(), func(tok jwt.Token) { tok.Set(jwt.ExpirationKey, time.Now().Add(-time.Hour)) })
	if rec := send("GET", "/events", expired); rec.Code != http.StatusUnauthorized ||
		!strings.Contains(rec.Header().Get("WWW-Authenticate"), `error="invalid_token"`) {
		t.Errorf("an expired token = %d (%s), want 401 invalid_token", rec.Code, rec.Header().Get("WWW-Authenticate"))
	}
	admin := idp.sign(t, "ec-1", jwa.ES256(), func(tok jwt.Token) { tok.Set("scope", "admin"); tok.Set(jwt.SubjectKey, "ops-bot") })
	if rec := send("POST", "/products", admin); rec.Code != http.StatusCreated {
		t.Fatalf("POST /products with admin = %d %s, want 201", rec.Code, rec.Body)
	}
	// An Idempotency-Key belongs to the subject: a retry with a fresh token
	// of the same subject replays, and creates nothing twice.
	retry := func(token string) *httptest.ResponseRecorder {
		req := httptest.NewRequest("POST", "/products", strings.NewReader(`{"sku":"J-2","name":"pen","price_cents":1}`))
		req.Header.Set("Content-Type", "application/json")
		req.Header.Set("Authorization", "Bearer "+token)
		req.Header.Set("Idempotency-Key", "create-j-2")
		rec := httptest.NewRecorder()
		h.ServeHTTP(rec, req)
		return rec
	}
	if rec := retry(admin); rec.Code != http.StatusCreated {
		t.Fatalf("create with a key = %d %s", rec.Code, rec.Body)
	}
	fresh := idp.sign(t, "ed-1", jwa.EdDSA(), func(tok jwt.Token) { tok.Set("scope", "admin"); tok.Set(jwt.SubjectKey, "ops-bot") })
	if rec := retry(fresh); rec.Code != http.StatusCreated || rec.Header().Get("Idempotency-Replayed") != "true" {
		t.Errorf("retry with a fresh token of the same subject = %d (Idempotency-Replayed %q), want 201 replayed",
			rec.Code, rec.Header().Get("Idempotency-Replayed"))
	}
	if !strings.Contains(logs.String(), `"actor":"ops-bot"`) || strings.Contains(logs.String(), admin[:40]) {
		t.Errorf("access log: want actor ops-bot and no token:\n%.3000s", logs.String())
	}
}
