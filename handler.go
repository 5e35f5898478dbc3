package main

import (
	"context"
	"crypto/sha256"
	_ "embed"
	"encoding/base64"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"maps"
	"math"
	"mime"
	"net/http"
	"slices"
	"strconv"
	"strings"
	"time"
)

// statusClientClosed is logged for requests whose client went away.
const statusClientClosed = 499

// maxBodyBytes caps request bodies.
const maxBodyBytes = 1 << 20

const (
	contentTypeJSON    = "application/json"
	contentTypeProblem = "application/problem+json"
)

var (
	jsonHeader    = []string{contentTypeJSON}
	problemHeader = []string{contentTypeProblem}
)

//go:embed openapi.json
var openAPIDocument []byte

// serverDeps are newServer's dependencies.
type serverDeps struct {
	svc          *ProductService
	log          *slog.Logger
	metrics      *metrics
	tokens       *tokenSet
	life         *lifecycle
	limiter      *rateLimiter   // nil: no limits; rps 0: failed authentication only
	proxies      trustedProxies // whose X-Forwarded-For names the client; nil: nobody's
	maxFlight    int
	serveMetrics bool         // /metrics on this listener
	tracing      *tracing     // nil: no tracing
	streams      *streamSlots // change-feed streams; nil: defaultFeedStreams
	backups      *backups     // nil: the engine's backups are its own (PostgreSQL)
	relay        *relay       // nil: no relay (AMQP_URL unset)
}

// newServer returns the service's HTTP handler: the routes of addRoutes
// inside the middleware every request passes through.
func newServer(d serverDeps) http.Handler {
	mux := http.NewServeMux()
	addRoutes(mux, d)
	var h http.Handler = mux
	if d.limiter != nil && d.limiter.rps > 0 {
		h = d.limiter.limit(d.metrics, h)
	}
	h = shedLoad(d.maxFlight, d.metrics, h)
	h = canonicalPaths(h)
	h = observe(d.log, d.metrics, d.proxies, h)
	if d.tracing != nil {
		h = d.tracing.wrap(h) // outermost: the server span covers everything
	}
	return h
}

// addRoutes lists the whole API.
func addRoutes(mux *http.ServeMux, d serverDeps) {
	// need wraps a handler in requireScope: a valid bearer token whose
	// credential holds s (or admin). Product reads stay anonymous.
	need := func(s scope, h http.Handler) http.Handler { return requireScope(d.tokens, d.limiter, s, h) }
	for _, p := range []string{"/health", "/health/live", "/livez"} {
		mux.Handle("GET "+p, handleHealth())
	}
	for _, p := range []string{"/ready", "/health/ready", "/readyz"} {
		mux.Handle("GET "+p, handleReady(d.svc, d.life, d.relay))
	}
	mux.Handle("GET /health/startup", handleStartup(d.life))
	if d.serveMetrics {
		mux.Handle("GET /metrics", d.metrics.handler())
	}
	mux.Handle("GET /openapi.json", handleOpenAPI())
	mux.Handle("GET /products", handleListProducts(d.svc))
	mux.Handle("POST /products", need(scopeCatalogWrite, handleCreateProduct(d.svc)))
	mux.Handle("GET /products/{id}", handleGetProduct(d.svc))
	mux.Handle("PUT /products/{id}", need(scopeCatalogWrite, handleReplaceProduct(d.svc)))
	mux.Handle("PATCH /products/{id}", need(scopeCatalogWrite, handlePatchProduct(d.svc)))
	mux.Handle("DELETE /products/{id}", need(scopeCatalogWrite, handleDeleteProduct(d.svc)))
	mux.Handle("PUT /products/{id}/stock", need(scopeStockWrite, handleSetStock(d.svc)))
	mux.Handle("POST /products/{id}/stock/adjustments", need(scopeStockWrite, handleAdjustStock(d.svc)))
	mux.Handle("POST /reservations", need(scopeReservationsWrite, handleCreateReservation(d.svc)))
	mux.Handle("GET /reservations", need(scopeReservationsRead, handleListReservations(d.svc)))
	mux.Handle("GET /reservations/{id}", need(scopeReservationsRead, handleGetReservation(d.svc)))
	mux.Handle("POST /reservations/{id}/confirm", need(scopeReservationsWrite, handleTransition(d.svc, StateConfirmed)))
	mux.Handle("POST /reservations/{id}/release", need(scopeReservationsWrite, handleTransition(d.svc, StateReleased)))
	mux.Handle("GET /events", need(scopeEventsRead, handleEvents(d.svc, d.life, d.streams)))
	mux.Handle("POST /admin/backups", need(scopeAdmin, handleCreateBackup(d.backups)))
	mux.Handle("GET /admin/backups", need(scopeAdmin, handleListBackups(d.backups)))
	mux.Handle("GET /admin/backups/{name}", need(scopeAdmin, handleGetBackup(d.backups)))
	mux.Handle("DELETE /admin/backups/{name}", need(scopeAdmin, handleDeleteBackup(d.backups)))
}

// handleCreateBackup takes a backup now: 201 with its manifest, 409 while
// another is being taken. The backup goes on if the client leaves.
func handleCreateBackup(b *backups) http.Handler {
	return handlerFunc(func(w http.ResponseWriter, r *http.Request) error {
		if b == nil {
			return ErrBackupsUnsupported
		}
		man, err := b.Create(context.WithoutCancel(r.Context()))
		if err != nil {
			return err
		}
		body, err := json.Marshal(man)
		if err != nil {
			return err
		}
		w.Header().Set("Location", "/admin/backups/"+man.Name)
		writeJSON(w, http.StatusCreated, body)
		return nil
	})
}

// handleListBackups lists the backups kept, oldest first.
func handleListBackups(b *backups) http.Handler {
	return handlerFunc(func(w http.ResponseWriter, r *http.Request) error {
		if b == nil {
			return ErrBackupsUnsupported
		}
		list, err := b.List()
		if err != nil {
			return err
		}
		body, err := json.Marshal(struct {
			Backups []backupManifest `json:"backups"`
		}{list})
		if err != nil {
			return err
		}
		w.Header().Set("Cache-Control", "no-store")
		writeJSON(w, http.StatusOK, body)
		return nil
	})
}

// handleGetBackup streams one backup, its SHA-256 in Repr-Digest (RFC
// 9530), so a copy can be checked end to end; ranges are served.
func handleGetBackup(b *backups) http.Handler {
	return handlerFunc(func(w http.ResponseWriter, r *http.Request) error {
		if b == nil {
			return ErrBackupsUnsupported
		}
		f, man, err := b.Open(r.PathValue("name"))
		if err != nil {
			return err
		}
		defer f.Close()
		sum, err := hex.DecodeString(man.SHA256)
		if err != nil {
			return fmt.Errorf("backup %s: manifest digest: %w", man.Name, err)
		}
		h := w.Header()
		h.Set("Content-Type", "application/vnd.sqlite3")
		h.Set("Content-Disposition", `attachment; filename="`+man.Name+`"`)
		h.Set("Repr-Digest", "sha-256=:"+base64.StdEncoding.EncodeToString(sum)+":")
		h.Set("Cache-Control", "no-store")
		// The server's WriteTimeout bounds the whole response; a backup
		// larger than it can send in that time is fetched in ranges.
		http.ServeContent(w, r, man.Name, time.Time{}, f) // no Last-Modified: a backup never changes
		return nil
	})
}

// handleDeleteBackup removes one backup: 204, or 404.
func handleDeleteBackup(b *backups) http.Handler {
	return handlerFunc(func(w http.ResponseWriter, r *http.Request) error {
		if b == nil {
			return ErrBackupsUnsupported
		}
		if err := b.Delete(r.PathValue("name")); err != nil {
			return err
		}
		w.WriteHeader(http.StatusNoContent)
		return nil
	})
}

// handlerFunc is a handler that can fail; errorHandler writes its error.
type handlerFunc func(w http.ResponseWriter, r *http.Request) error

func (f handlerFunc) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	if err := f(w, r); err != nil {
		writeError(w, r, err)
	}
}

func handleHealth() http.Handler {
	body := []byte(`{"status":"ok"}`)
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		writeJSON(w, http.StatusOK, body)
	})
}

func handleStartup(life *lifecycle) http.Handler {
	return handlerFunc(func(w http.ResponseWriter, r *http.Request) error {
		if !life.started.Load() {
			return &UnavailableError{Reason: "the service is starting", RetryAfter: time.Second}
		}
		writeJSON(w, http.StatusOK, []byte(`{"status":"ok"}`))
		return nil
	})
}

// readyBody is the /ready document.
type readyBody struct {
	Status string `json:"status"`
	Checks struct {
		Database struct {
			Status  string `json:"status"`
			Backend string `json:"backend"` // sqlite or postgres
		} `json:"database"`
		Cache struct {
			Status string `json:"status"`
		} `json:"cache"`
		Breaker struct {
			State string `json:"state"`
			Read  string `json:"read"`
			Write string `json:"write"`
		} `json:"breaker"`
		// Broker is the relay's broker: "disabled" (no AMQP_URL), "up",
		// "down", or "standby" (another replica publishes).
		Broker struct {
			Status string `json:"status"`
			URL    string `json:"url,omitempty"`   // redacted
			Error  string `json:"error,omitempty"` // the last failure, while down
		} `json:"broker"`
	} `json:"checks"`
}

// handleReady answers 200 while reads can be served ("ok", or "degraded"
// when Redis or the relay's broker is down or writes are failing) and 503
// otherwise, including from the moment a shutdown begins. rl is nil when
// the relay is off.
func handleReady(svc *ProductService, life *lifecycle, rl *relay) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		rd := svc.Ready(r.Context())
		var body readyBody
		body.Checks.Database.Status = rd.Database
		body.Checks.Database.Backend = svc.dbSystem
		body.Checks.Cache.Status = rd.Cache
		body.Checks.Breaker.Read = breakerName(rd.ReadState)
		body.Checks.Breaker.Write = breakerName(rd.WriteState)
		body.Checks.Breaker.State = breakerName(max(rd.ReadState, rd.WriteState))
		body.Checks.Broker.Status = "disabled"
		if rl != nil {
			st := rl.Status()
			body.Checks.Broker.URL = st.URL
			switch {
			case !st.Leader:
				body.Checks.Broker.Status = "standby"
			case st.BrokerUp:
				body.Checks.Broker.Status = "up"
			default:
				body.Checks.Broker.Status, body.Checks.Broker.Error = "down", st.Err
			}
		}
		status := http.StatusOK
		switch {
		case !life.started.Load() || life.shuttingDown.Load() || !rd.CanServeReads():
			body.Status, status = "unavailable", http.StatusServiceUnavailable
		case rd.Cache == "down" || rd.WriteState != 0 || body.Checks.Broker.Status == "down":
			body.Status = "degraded"
		default:
			body.Status = "ok"
		}
		b, _ := json.Marshal(body)
		w.Header().Set("Cache-Control", "no-store")
		writeJSON(w, status, b)
	})
}

// breakerName maps gobreaker states (closed < half-open < open) to the
// names /ready uses.
func breakerName[S ~int](s S) string {
	switch s {
	case 1:
		return "half-open"
	case 2:
		return "open"
	}
	return "closed"
}

func handleOpenAPI() http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		writeJSON(w, http.StatusOK, openAPIDocument)
	})
}

func handleListProducts(svc *ProductService) http.Handler {
	return handlerFunc(func(w http.ResponseWriter, r *http.Request) error {
		f, err := parseListQuery(r.URL.RawQuery)
		if err != nil {
			return err
		}
		body, err := svc.ListJSON(r.Context(), r.URL.RawQuery, f)
		if err != nil {
			return err
		}
		writeJSON(w, http.StatusOK, body)
		return nil
	})
}

func handleGetProduct(svc *ProductService) http.Handler {
	return handlerFunc(func(w http.ResponseWriter, r *http.Request) error {
		id, err := parseID(r)
		if err != nil {
			return err
		}
		v, source, err := svc.Get(r.Context(), id)
		setCacheResult(r.Context(), source)
		if err != nil {
			return err
		}
		h := w.Header()
		h["Etag"] = []string{etag(v.Version)}
		if inm := r.Header.Get("If-None-Match"); inm != "" && etagListMatches(inm, v.Version, true) {
			w.WriteHeader(http.StatusNotModified)
			return nil
		}
		writeJSON(w, http.StatusOK, v.JSON)
		return nil
	})
}

func handleCreateProduct(svc *ProductService) http.Handler {
	return handlerFunc(func(w http.ResponseWriter, r *http.Request) error {
		body, err := readBody(w, r, false)
		if err != nil {
			return err
		}
		idem, err := idempotencyKey(r, body)
		if err != nil {
			return err
		}
		var in ProductInput
		if err := decodeStrict(body, &in); err != nil {
			return err
		}
		p, replayed, err := svc.Create(r.Context(), in, idem)
		if err != nil {
			return err
		}
		if replayed {
			w.Header().Set("Idempotency-Replayed", "true")
		}
		w.Header().Set("Location", "/products/"+strconv.FormatInt(p.ID, 10))
		writeProduct(w, http.StatusCreated, p)
		return nil
	})
}

func handleReplaceProduct(svc *ProductService) http.Handler {
	return handlerFunc(func(w http.ResponseWriter, r *http.Request) error {
		id, cond, err := writeTarget(r)
		if err != nil {
			return err
		}
		var in ProductInput
		if err := decode(w, r, &in); err != nil {
			return err
		}
		p, err := svc.Replace(r.Context(), id, in, cond)
		if err != nil {
			return err
		}
		writeProduct(w, http.StatusOK, p)
		return nil
	})
}

func handlePatchProduct(svc *ProductService) http.Handler {
	return handlerFunc(func(w http.ResponseWriter, r *http.Request) error {
		id, cond, err := writeTarget(r)
		if err != nil {
			return err
		}
		body, err := readBody(w, r, true)
		if err != nil {
			return err
		}
		patch, err := decodePatch(body)
		if err != nil {
			return err
		}
		p, err := svc.Patch(r.Context(), id, patch, cond)
		if err != nil {
			return err
		}
		writeProduct(w, http.StatusOK, p)
		return nil
	})
}

func handleDeleteProduct(svc *ProductService) http.Handler {
	return handlerFunc(func(w http.ResponseWriter, r *http.Request) error {
		id, cond, err := writeTarget(r)
		if err != nil {
			return err
		}
		if err := svc.Delete(r.Context(), id, cond); err != nil {
			return err
		}
		w.WriteHeader(http.StatusNoContent)
		return nil
	})
}

func handleSetStock(svc *ProductService) http.Handler {
	return handlerFunc(func(w http.ResponseWriter, r *http.Request) error {
		id, cond, err := writeTarget(r)
		if err != nil {
			return err
		}
		var in struct {
			Stock *int64 `json:"stock"`
		}
		if err := decode(w, r, &in); err != nil {
			return err
		}
		if in.Stock == nil {
			return &ValidationError{Problems: map[string]string{"stock": "is required"}}
		}
		p, err := svc.SetStock(r.Context(), id, *in.Stock, cond)
		if err != nil {
			return err
		}
		writeProduct(w, http.StatusOK, p)
		return nil
	})
}

func handleAdjustStock(svc *ProductService) http.Handler {
	return handlerFunc(func(w http.ResponseWriter, r *http.Request) error {
		id, cond, err := writeTarget(r)
		if err != nil {
			return err
		}
		body, err := readBody(w, r, false)
		if err != nil {
			return err
		}
		idem, err := idempotencyKey(r, body)
		if err != nil {
			return err
		}
		var in struct {
			Delta *int64 `json:"delta"`
		}
		if err := decodeStrict(body, &in); err != nil {
			return err
		}
		if in.Delta == nil {
			return &ValidationError{Problems: map[string]string{"delta": "is required"}}
		}
		p, replayed, err := svc.AdjustStock(r.Context(), id, *in.Delta, cond, idem)
		if err != nil {
			return err
		}
		if replayed {
			w.Header().Set("Idempotency-Replayed", "true")
		}
		writeProduct(w, http.StatusOK, p)
		return nil
	})
}

// idempotencyKey reads the Idempotency-Key of a write. Keys are scoped to
// the bearer token (an access token's subject), and bound to the method,
// path and body of the request.
func idempotencyKey(r *http.Request, body []byte) (*IdempotencyKey, error) {
	vals := r.Header.Values("Idempotency-Key")
	if len(vals) == 0 {
		return nil, nil
	}
	k := vals[0]
	if len(vals) > 1 || len(k) == 0 || len(k) > 255 || strings.IndexFunc(k, func(c rune) bool { return c < 0x20 || c > 0x7e }) >= 0 {
		return nil, &BadRequestError{Detail: "Idempotency-Key must be one value of 1 to 255 printable ASCII characters",
			Problems: map[string]string{"Idempotency-Key": "is malformed"}}
	}
	_, tok, _ := strings.Cut(r.Header.Get("Authorization"), " ")
	owner := strings.TrimSpace(tok)
	if p, ok := principalFrom(r.Context()); ok && strings.HasPrefix(p.key, "jwt:") {
		// An access token is replaced every few minutes: its subject, not
		// the token, owns the keys, so a retry with a fresh token replays.
		// A NUL cannot be in a static token (nor in any header).
		owner = "\x00" + p.key
	}
	scope := sha256.Sum256([]byte(owner))
	h := sha256.New()
	io.WriteString(h, r.Method+" "+r.URL.Path+"\n")
	h.Write(body)
	return &IdempotencyKey{
		Scope:       hex.EncodeToString(scope[:16]),
		Key:         k,
		Fingerprint: hex.EncodeToString(h.Sum(nil)),
	}, nil
}

// parseID reads the {id} path value: a positive int64.
func parseID(r *http.Request) (int64, error) {
	s := r.PathValue("id")
	id, err := strconv.ParseInt(s, 10, 64)
	if err != nil || id < 1 || s[0] == '+' {
		return 0, badParam("id", "must be a positive integer of at most 9223372036854775807")
	}
	return id, nil
}

// writeTarget reads the id and the If-Match precondition of a write.
func writeTarget(r *http.Request) (int64, *IfMatch, error) {
	id, err := parseID(r)
	if err != nil {
		return 0, nil, err
	}
	cond, err := parseIfMatch(r.Header.Values("If-Match"))
	return id, cond, err
}

// etag is the entity tag of a product version.
func etag(version int64) string { return `"` + strconv.FormatInt(version, 10) + `"` }

// parseIfMatch parses If-Match: "*" or a list of entity tags. Weak tags
// never match (If-Match uses strong comparison) but are well-formed.
func parseIfMatch(values []string) (*IfMatch, error) {
	if len(values) == 0 {
		return nil, nil
	}
	m := &IfMatch{}
	for _, v := range values {
		for _, tag := range strings.Split(v, ",") {
			tag = strings.TrimSpace(tag)
			switch {
			case tag == "":
			case tag == "*":
				m.Any = true
			case strings.HasPrefix(tag, "W/") && validETag(tag[2:]):
				// weak: can never match
			case validETag(tag):
				if n, err := strconv.ParseInt(tag[1:len(tag)-1], 10, 64); err == nil {
					m.Versions = append(m.Versions, n)
				}
			default:
				return nil, &BadRequestError{Detail: "If-Match must be * or a list of entity tags such as \"3\"",
					Problems: map[string]string{"If-Match": "is malformed"}}
			}
		}
	}
	if !m.Any && len(m.Versions) == 0 {
		m.Versions = []int64{} // only weak or unknown tags: nothing matches
	}
	return m, nil
}

func validETag(s string) bool {
	if len(s) < 2 || s[0] != '"' || s[len(s)-1] != '"' {
		return false
	}
	for i := 1; i < len(s)-1; i++ {
		if c := s[i]; c == '"' || c < 0x21 || c == 0x7f {
			return false
		}
	}
	return true
}

// etagListMatches reports whether the If-None-Match header names version
// ("*" matches anything). If-None-Match uses weak comparison. A malformed
// header matches nothing, so the full response is sent.
func etagListMatches(header string, version int64, weak bool) bool {
	want := etag(version)
	for _, tag := range strings.Split(header, ",") {
		tag = strings.TrimSpace(tag)
		if tag == "*" {
			return true
		}
		if weak {
			tag = strings.TrimPrefix(tag, "W/")
		}
		if tag == want {
			return true
		}
	}
	return false
}

// readBody checks the content type and reads the body of a write, at most
// maxBodyBytes of it.
func readBody(w http.ResponseWriter, r *http.Request, mergePatch bool) ([]byte, error) {
	if err := checkContentType(r.Header.Get("Content-Type"), mergePatch); err != nil {
		return nil, err
	}
	if r.ContentLength > maxBodyBytes {
		return nil, errTooLarge
	}
	body, err := io.ReadAll(http.MaxBytesReader(w, r.Body, maxBodyBytes))
	if err != nil {
		var mbe *http.MaxBytesError
		if errors.As(err, &mbe) {
			return nil, errTooLarge
		}
		return nil, &BadRequestError{Detail: "the request body could not be read"}
	}
	return body, nil
}

var errTooLarge = &httpError{status: http.StatusRequestEntityTooLarge, detail: "the request body is larger than 1 MiB"}

func checkContentType(ct string, mergePatch bool) error {
	want := "application/json"
	if mergePatch {
		want += " or application/merge-patch+json"
	}
	unsupported := &httpError{status: http.StatusUnsupportedMediaType, detail: "the Content-Type must be " + want}
	if ct == "" {
		return unsupported
	}
	mt, params, err := mime.ParseMediaType(ct)
	if err != nil {
		return unsupported
	}
	if mt != "application/json" && !(mergePatch && mt == "application/merge-patch+json") {
		return unsupported
	}
	if cs, ok := params["charset"]; ok && !strings.EqualFold(cs, "utf-8") {
		return &httpError{status: http.StatusUnsupportedMediaType, detail: "the only supported charset is utf-8"}
	}
	return nil
}

// decode reads a JSON body strictly into v.
func decode(w http.ResponseWriter, r *http.Request, v any) error {
	body, err := readBody(w, r, false)
	if err != nil {
		return err
	}
	return decodeStrict(body, v)
}

// writeJSON writes an already encoded JSON body: headers, then status, then
// body, so an encoding failure can never leave a half-written 200.
func writeJSON(w http.ResponseWriter, status int, body []byte) {
	h := w.Header()
	h["Content-Type"] = jsonHeader
	h["Content-Length"] = []string{strconv.Itoa(len(body))}
	w.WriteHeader(status)
	w.Write(body)
}

func writeProduct(w http.ResponseWriter, status int, p Product) {
	w.Header()["Etag"] = []string{etag(p.Version)}
	writeJSON(w, status, appendProduct(make([]byte, 0, 512), &p))
}

// httpError is an error about the HTTP exchange itself (a missing token, a
// wrong content type), with the status to answer.
type httpError struct {
	status int
	detail string
}

func (e *httpError) Error() string { return e.detail }

// problemTypes names each status's problem type (RFC 9457), relative to the
// service: "/problems/not-found".
var problemTypes = map[int]string{
	http.StatusBadRequest:            "bad-request",
	http.StatusUnauthorized:          "unauthorized",
	http.StatusForbidden:             "forbidden",
	http.StatusNotFound:              "not-found",
	http.StatusMethodNotAllowed:      "method-not-allowed",
	http.StatusConflict:              "conflict",
	http.StatusPreconditionFailed:    "precondition-failed",
	http.StatusRequestEntityTooLarge: "payload-too-large",
	http.StatusUnsupportedMediaType:  "unsupported-media-type",
	http.StatusUnprocessableEntity:   "validation",
	http.StatusTooManyRequests:       "too-many-requests",
	http.StatusInternalServerError:   "internal",
	http.StatusServiceUnavailable:    "unavailable",
}

// errorStatus maps domain errors to HTTP statuses: the one such table.
var errorStatus = []struct {
	err    error
	status int
	slug   string
	detail string
}{
	{ErrNotFound, http.StatusNotFound, "not-found", "no product has this id"},
	{ErrInsufficientStock, http.StatusConflict, "insufficient-stock", "the adjustment would take stock below zero (or above the maximum); nothing was changed"},
	{ErrConflict, http.StatusConflict, "conflict", "a product with this sku already exists"},
	{ErrPrecondition, http.StatusPreconditionFailed, "precondition-failed", "the product has changed: If-Match does not name its current ETag; nothing was changed"},
	{ErrIdempotencyMismatch, http.StatusUnprocessableEntity, "idempotency-key-reused", "this Idempotency-Key was used with a different request"},
	// A *ValidationError is answered above with its fields; a bare ErrInvalid
	// is a value the database refused (a CHECK constraint).
	{ErrInvalid, http.StatusUnprocessableEntity, "validation", "the request is not valid: a value is out of range"},
	{ErrReserved, http.StatusConflict, "product-reserved", "open reservations hold units of this product; release or confirm them first"},
	{ErrReservationNotFound, http.StatusNotFound, "reservation-not-found", "no reservation has this id"},
	{ErrInvalidState, http.StatusConflict, "invalid-state", "the reservation was already confirmed or released the other way; nothing was changed"},
	{ErrReservationExpired, http.StatusConflict, "reservation-expired", "the hold expired and its units are available again; reserve again"},
	{ErrHoldCap, http.StatusConflict, "hold-cap-exceeded", "this credential may not hold more units in open reservations (max_held); nothing was held"},
	{ErrFeedGone, http.StatusGone, "feed-gone", ""},
	{ErrBackupNotFound, http.StatusNotFound, "backup-not-found", "no backup has this name"},
	{ErrBackupRunning, http.StatusConflict, "backup-running", "a backup is being taken; retry when it is done"},
	{ErrBackupsUnsupported, http.StatusNotImplemented, "backups-unsupported", "this service runs on PostgreSQL, whose backups are PostgreSQL's own (pg_dump, base backups and WAL archiving); see the README, \"Backups and restores\""},
	{ErrUnavailable, http.StatusServiceUnavailable, "unavailable", ""},
}

// writeError answers err as application/problem+json. Client errors say what
// was wrong; server errors say nothing of their cause, which goes to the log.
func writeError(w http.ResponseWriter, r *http.Request, err error) {
	if errors.Is(err, context.Canceled) && r.Context().Err() != nil {
		// The client went away; nobody reads this answer. 499 (nginx's
		// "client closed request") keeps it apart from server errors in
		// the access log and metrics.
		w.WriteHeader(statusClientClosed)
		return
	}
	status, slug, detail := http.StatusInternalServerError, "", ""
	var problems map[string]string
	var (
		herr  *httpError
		bad   *BadRequestError
		verr  *ValidationError
		uerr  *UnavailableError
		rerr  *rateLimitError
		short *ShortageError
		gone  *FeedGoneError
		reset *FeedResetError
		scope *scopeError
		hcap  *HoldCapError
	)
	switch {
	case errors.As(err, &scope):
		// RFC 6750 §3.1: the challenge names the scope the token lacks.
		status, slug, detail = http.StatusForbidden, "insufficient-scope", scope.Error()
		problems = map[string]string{"scope": scope.need.String() + " is required"}
		w.Header().Set("WWW-Authenticate", `Bearer realm="productsvc", error="insufficient_scope", scope="`+scope.need.String()+`"`)
	case errors.As(err, &herr):
		status, detail = herr.status, herr.detail
	case errors.As(err, &bad):
		status, detail, problems = http.StatusBadRequest, bad.Detail, bad.Problems
	case errors.As(err, &verr):
		status, detail, problems = http.StatusUnprocessableEntity, "the request is not valid: see errors", verr.Problems
	case errors.As(err, &rerr):
		status, detail = http.StatusTooManyRequests, rerr.Error()
		w.Header().Set("Retry-After", retryAfter(rerr.retryAfter))
	case errors.As(err, &hcap):
		status, slug, detail = http.StatusConflict, "hold-cap-exceeded", hcap.Error()
		problems = map[string]string{"lines": fmt.Sprintf("%d units requested; the cap (max_held) is %d and %d are held", hcap.Requested, hcap.Cap, hcap.Held)}
	case errors.As(err, &short):
		status, slug, detail = http.StatusConflict, "insufficient-stock", "some lines are short; nothing was held: see errors"
		problems = make(map[string]string, len(short.Lines))
		for _, l := range short.Lines {
			problems[fmt.Sprintf("lines[%d].quantity", l.Line)] = fmt.Sprintf("%d requested, %d available", l.Requested, l.Available)
		}
	case errors.As(err, &reset):
		status, slug, detail = http.StatusGone, "feed-reset", reset.Error()
		problems = map[string]string{"after": fmt.Sprintf("beyond the head of this feed, seq %d", reset.Head)}
		if reset.LogID != "" {
			problems = map[string]string{"log_id": "not this feed's; its log_id is " + reset.LogID}
		}
	case errors.As(err, &gone):
		status, slug, detail = http.StatusGone, "feed-gone", gone.Error()
		problems = map[string]string{"after": fmt.Sprintf("older than the oldest event kept, seq %d", gone.Oldest)}
	default:
		for _, e := range errorStatus {
			if errors.Is(err, e.err) {
				status, slug, detail = e.status, e.slug, e.detail
				break
			}
		}
	}
	if status == http.StatusServiceUnavailable {
		ra := time.Second
		if errors.As(err, &uerr) {
			ra = uerr.RetryAfter
		}
		w.Header().Set("Retry-After", retryAfter(ra))
		detail = "the service cannot handle this request right now; retry after the Retry-After delay"
		if !isRejected(r.Context()) { // shed requests are counted and sampled instead
			loggerFrom(r.Context(), nil).WarnContext(r.Context(), "unavailable", "err", err.Error())
		}
	}
	if status == http.StatusInternalServerError {
		attrs := []any{"err", err.Error(), "method", r.Method, "path", r.URL.Path}
		if st, ok := errors.AsType[stackError](err); ok { // a panic recovered off the request's goroutine
			attrs = append(attrs, "stack", string(st.Stack()))
		}
		loggerFrom(r.Context(), nil).ErrorContext(r.Context(), "internal error", attrs...)
		detail = ""
	}
	writeProblem(w, r, status, slug, detail, problems)
}

// stackError is an error that carries the stack where it arose: a panic
// recovered on another goroutine (such as SQLite's writer) on the request's
// behalf.
type stackError interface {
	error
	Stack() []byte
}

func retryAfter(d time.Duration) string {
	return strconv.Itoa(max(1, int(math.Ceil(d.Seconds()))))
}

// problem is an RFC 9457 problem document.
type problem struct {
	Type          string            `json:"type"`
	Title         string            `json:"title"`
	Status        int               `json:"status"`
	Detail        string            `json:"detail"`
	Instance      string            `json:"instance"`
	RequestID     string            `json:"request_id,omitempty"`
	Errors        map[string]string `json:"errors,omitempty"`
	ErrorsOmitted int               `json:"errors_omitted,omitempty"` // problems left out of Errors
}

// maxProblemsListed bounds the errors a problem document lists: an input
// can be wrong in as many places as it has bytes, and the answer must stay
// small however much was sent. The rest are counted, not named.
const maxProblemsListed = 20

// firstKeys returns the n smallest keys of m, sorted, without sorting all
// of them: m may hold a problem for every element of a large input.
func firstKeys(m map[string]string, n int) []string {
	if len(m) <= n {
		return slices.Sorted(maps.Keys(m))
	}
	keys := make([]string, 0, n+1)
	for k := range m {
		if len(keys) == n && k >= keys[n-1] {
			continue
		}
		i, _ := slices.BinarySearch(keys, k)
		keys = slices.Insert(keys, i, k)
		if len(keys) > n {
			keys = keys[:n]
		}
	}
	return keys
}

// writeProblem writes a problem document and returns the bytes written.
// slug names the problem type; empty means the status's generic type.
func writeProblem(w http.ResponseWriter, r *http.Request, status int, slug, detail string, problems map[string]string) int {
	if slug == "" {
		slug = problemTypes[status]
		if slug == "" {
			slug = "about"
		}
	}
	if detail == "" {
		switch status {
		case http.StatusNotFound:
			detail = "no resource at this path"
		case http.StatusMethodNotAllowed:
			detail = "this method is not allowed here; see the Allow header"
		case http.StatusInternalServerError:
			detail = "an internal error occurred; the request id identifies it in the service's logs"
		default:
			detail = http.StatusText(status)
		}
	}
	listed := firstKeys(problems, maxProblemsListed)
	omitted := len(problems) - len(listed)
	if omitted > 0 {
		detail += fmt.Sprintf(" (%d more problems are not listed; errors names the first %d)", omitted, len(listed))
	}
	// Encoded by hand, in problem's field order: a refused request under a
	// flood must cost less than a served one, and reflection is most of
	// what an error costs otherwise.
	requestID := ""
	if info := infoFrom(r.Context()); info != nil {
		requestID = info.id
	}
	b := make([]byte, 0, 256)
	b = append(b, `{"type":`...)
	b = appendString(b, "/problems/"+slug)
	b = append(b, `,"title":`...)
	b = appendString(b, http.StatusText(status))
	b = append(b, `,"status":`...)
	b = strconv.AppendInt(b, int64(status), 10)
	b = append(b, `,"detail":`...)
	b = appendString(b, detail)
	b = append(b, `,"instance":`...)
	b = appendString(b, r.URL.Path)
	if requestID != "" {
		b = append(b, `,"request_id":`...)
		b = appendString(b, requestID)
	}
	if len(problems) > 0 {
		b = append(b, `,"errors":{`...)
		for i, k := range listed {
			if i > 0 {
				b = append(b, ',')
			}
			b = appendString(b, k)
			b = append(b, ':')
			b = appendString(b, problems[k])
		}
		b = append(b, '}')
		if omitted > 0 {
			b = append(b, `,"errors_omitted":`...)
			b = strconv.AppendInt(b, int64(omitted), 10)
		}
	}
	b = append(b, "}\n"...)
	h := w.Header()
	h["Content-Type"] = problemHeader
	h["Content-Length"] = []string{strconv.Itoa(len(b))}
	h.Del("Etag")
	h.Del("Location")
	w.WriteHeader(status)
	n, _ := w.Write(b)
	return n
}

func handleCreateReservation(svc *ProductService) http.Handler {
	return handlerFunc(func(w http.ResponseWriter, r *http.Request) error {
		body, err := readBody(w, r, false)
		if err != nil {
			return err
		}
		idem, err := idempotencyKey(r, body)
		if err != nil {
			return err
		}
		in, err := decodeReservationInput(body)
		if err != nil {
			return err
		}
		res, replayed, err := svc.Reserve(r.Context(), in, idem)
		if err != nil {
			return err
		}
		if replayed {
			w.Header().Set("Idempotency-Replayed", "true")
		}
		w.Header().Set("Location", "/reservations/"+res.ID)
		writeJSON(w, http.StatusCreated, appendReservation(nil, &res))
		return nil
	})
}

func handleGetReservation(svc *ProductService) http.Handler {
	return handlerFunc(func(w http.ResponseWriter, r *http.Request) error {
		id, err := reservationID(r)
		if err != nil {
			return err
		}
		res, err := svc.Reservation(r.Context(), id)
		if err != nil {
			return err
		}
		writeJSON(w, http.StatusOK, appendReservation(nil, &res))
		return nil
	})
}

// handleListReservations answers GET /reservations?reference=…: the holds an
// order service made under its reference, so one that crashed after
// reserving finds them again.
func handleListReservations(svc *ProductService) http.Handler {
	return handlerFunc(func(w http.ResponseWriter, r *http.Request) error {
		values, err := parseQuery(r.URL.RawQuery)
		if err != nil {
			return err
		}
		problems := map[string]string{}
		for name, vals := range values {
			if name != "reference" {
				problems[name] = "is not a known parameter"
			} else if len(vals) > 1 {
				problems[name] = "must be given at most once"
			}
		}
		ref := values.Get("reference")
		if msg := (ReservationInput{Reference: &ref}).Valid()["reference"]; msg != "" && problems["reference"] == "" {
			problems["reference"] = msg
		}
		if len(problems) > 0 {
			return &BadRequestError{Detail: "invalid query parameters", Problems: problems}
		}
		rs, err := svc.ReservationsByReference(r.Context(), ref)
		if err != nil {
			return err
		}
		b := append(make([]byte, 0, 256*len(rs)+16), `{"items":[`...)
		for i := range rs {
			if i > 0 {
				b = append(b, ',')
			}
			b = appendReservation(b, &rs[i])
		}
		writeJSON(w, http.StatusOK, append(b, "]}"...))
		return nil
	})
}

// handleTransition confirms or releases a reservation. The same transition
// again answers 200 with the same body.
func handleTransition(svc *ProductService, to string) http.Handler {
	return handlerFunc(func(w http.ResponseWriter, r *http.Request) error {
		id, err := reservationID(r)
		if err != nil {
			return err
		}
		if r.ContentLength > 0 {
			return &BadRequestError{Detail: "this request takes no body"}
		}
		move := svc.Confirm
		if to == StateReleased {
			move = svc.Release
		}
		res, err := move(r.Context(), id)
		if err != nil {
			return err
		}
		writeJSON(w, http.StatusOK, appendReservation(nil, &res))
		return nil
	})
}

// reservationID reads the {id} path value. Ids are opaque; one the service
// cannot have made is simply not found.
func reservationID(r *http.Request) (string, error) {
	id := r.PathValue("id")
	if !validReservationID(id) {
		return "", ErrReservationNotFound
	}
	return id, nil
}

func validReservationID(id string) bool {
	hexPart, ok := strings.CutPrefix(id, "res_")
	if !ok || len(hexPart) != 32 {
		return false
	}
	_, err := hex.DecodeString(hexPart)
	return err == nil && strings.ToLower(hexPart) == hexPart
}
