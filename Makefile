# productsvc — see README.md.
VERSION  ?= $(shell git describe --tags --always --dirty 2>/dev/null || echo dev)
LDFLAGS  := -s -w -X main.version=$(VERSION)
# Fuzz targets run for a number of executions, not a duration: a duration
# races Go 1.26's fuzzing coordinator at the deadline, which can then fail a
# target with "context deadline exceeded" though no input failed
# (golang/go#75804, fixed in Go 1.27). FUZZTIME (a duration or Nx) overrides.
FUZZ_FAST ?= 150000x
FUZZ_SLOW ?= 50000x
IMAGE    ?= productsvc:$(VERSION)
PROMTOOL ?= $(shell command -v promtool 2>/dev/null || echo /tmp/prom/usr/bin/promtool)
REDOCLY  ?= @redocly/cli@2.77.0

.PHONY: run build test lint lint-metrics lint-openapi promtool test-faults test-fleet fuzz bench bench-backup fleet docker-build docker-run

## run: build and start the service on :8080 with ./products.db (Redis when REDIS_URL is set)
run: build
	./productsvc

## build: a static binary, ./productsvc
build:
	CGO_ENABLED=0 go build -trimpath -ldflags "$(LDFLAGS)" -o productsvc .

## test: unit and integration tests with the race detector (real SQLite, real redis-server when installed)
test:
	go test -race -count=1 -timeout 15m .

## lint: gofmt and go vet
lint:
	@out="$$(gofmt -l .)"; if [ -n "$$out" ]; then echo "gofmt needed:"; echo "$$out"; exit 1; fi
	go vet ./...

## promtool: Debian's promtool, unpacked without installing the Prometheus server
promtool:
	@test -x $(PROMTOOL) || { cd /tmp && apt-get download prometheus && dpkg -x prometheus_*.deb /tmp/prom; }

## lint-metrics: promtool check metrics on a scrape taken after scripted requests
lint-metrics: promtool
	PROMTOOL=$(PROMTOOL) go test -count=1 -run '^TestMetrics_promtool$$' -v .

## lint-openapi: Redocly lint of openapi.json; any finding fails
lint-openapi:
	npx --yes $(REDOCLY) lint --extends=recommended-strict --format=stylish openapi.json

## test-faults: the black-box fault suite against the real binary (see e2e/), on SQLite then on PostgreSQL
test-faults:
	go test -count=1 -v -timeout 40m ./e2e/
	E2E_BACKEND=postgres go test -count=1 -v -timeout 40m ./e2e/

## test-fleet: only the fleet suite (replicas on one PostgreSQL and one Redis, behind HAProxy); test-faults runs it too
test-fleet:
	E2E_BACKEND=postgres go test -count=1 -v -run '^TestFleet' -timeout 15m ./e2e/

## fuzz: run each fuzz target (FUZZ_FAST or FUZZ_SLOW executions, or FUZZTIME)
fuzz:
	go test -run '^$$' -fuzz '^FuzzDecodeProductInput$$' -fuzztime $(or $(FUZZTIME),$(FUZZ_FAST)) .
	go test -run '^$$' -fuzz '^FuzzDecodeReservationInput$$' -fuzztime $(or $(FUZZTIME),$(FUZZ_FAST)) .
	go test -run '^$$' -fuzz '^FuzzParseListQuery$$' -fuzztime $(or $(FUZZTIME),$(FUZZ_SLOW)) .
	go test -run '^$$' -fuzz '^FuzzHandler$$' -fuzztime $(or $(FUZZTIME),$(FUZZ_SLOW)) .

## bench: the reproducible benchmark; writes bench/results.md
bench:
	bash bench/run.sh

## bench-backup: backup API vs VACUUM INTO on 200,000 products, and writer p99 during a backup
bench-backup:
	BACKUP_MEASURE=200000 go test -count=1 -run 'TestBackup_measure' -v .

## fleet: 3 replicas behind HAProxy on PostgreSQL + Redis (deploy/fleet.sh)
fleet:
	bash deploy/fleet.sh

## docker-build: the image, tagged $(IMAGE) and productsvc:latest (the tag deploy/kubernetes uses)
docker-build:
	docker build --build-arg VERSION=$(VERSION) -t $(IMAGE) -t productsvc:latest .

docker-run:
	docker run --rm -p 8080:8080 -v productsvc-data:/data -e API_TOKEN $(IMAGE)
