# pg_sync: the two commands a new machine needs are `make run` and `make test`.
PG_CONFIG ?= /usr/lib/postgresql/15/bin/pg_config
export PG_CONFIG
CARGO_PGRX_INSTALL = cargo pgrx install --release --pg-config $(PG_CONFIG)

.PHONY: deps install test unit regress integration lint run stop bench bench-peers bench-soak soak

deps:
	bash scripts/deps.sh

# Installs the extension into the Postgres that PG_CONFIG names (sudo when not root).
install: deps
	cd pg_sync && if [ -w "$$($(PG_CONFIG) --pkglibdir)" ]; then $(CARGO_PGRX_INSTALL); else $(CARGO_PGRX_INSTALL) --sudo; fi

# Everything CI runs.
test: install unit regress integration

unit:
	cargo test -p pg_sync_lww --lib
	cargo test -p pg_sync_bench --lib
	bash bench/lib_test.sh

regress:
	bash scripts/regress.sh
	bash scripts/isolation.sh

# Every test target of both packages (#[ignore]d soaks excepted), in cargo-nextest: one process
# per test, four at a time; .config/nextest.toml says which tests run alone or first.
integration:
	cargo nextest run -p pg_sync_tests -p sync_worker

lint:
	cargo fmt --all -- --check
	cargo clippy --all-targets -- -D warnings

# A project-local Postgres 15 (./.run) with the extension, the demo schema and the worker.
run: install
	cargo build --release -p sync_worker
	bash scripts/run.sh

stop:
	bash scripts/run.sh stop

bench: install
	cargo build --release -p sync_worker
	bash bench/write_overhead.sh
	bash bench/capture_wal.sh
	bash bench/capture_wal_records.sh
	bash bench/capture_single.sh
	bash bench/tail.sh
	bash bench/latency.sh
	bash bench/fanout.sh
	bash bench/bootstrap.sh
	bash bench/shape.sh
	node bench/shape_parse.mjs
	bash bench/shape_live.sh
	bash bench/mutate.sh
	bash bench/join.sh
	bash bench/hostile.sh
	bash bench/replay.sh
	bash bench/federation.sh
	bash bench/apply_batch.sh
	bash bench/long_history.sh
	$(SOAK)

# The three-region soak (issue 10): 3 clusters + 3 workers in full mesh, SOAK_RATE (500) writes/s
# per node for SOAK_SECONDS (600) with random link cuts; converges exactly once, worker RSS flat.
# About 12 min at the defaults; SOAK_SEED=<n> replays a printed seed. Not part of `make test`.
SOAK = cargo test --release -p sync_worker --test federation_chaos three_region_soak -- --ignored --nocapture

bench-soak: install
	$(SOAK)

# pg_sync side by side with Zero (bench/peers/README.md): installs @rocicorp/zero from
# bench/peers/package-lock.json the first time (its SQLite addon compiles, ~5 min), then about
# 20 min for 3 rounds; not part of `make bench` (too long).
bench-peers: install
	bash bench/peers/run.sh

# A long seeded federation chaos run (3 clusters, 3 workers, random link faults and kills);
# FEDCHAOS_SEED=<n> replays a printed seed.
soak: install
	FEDCHAOS_ROUNDS=$${FEDCHAOS_ROUNDS:-150} cargo test -p sync_worker --test federation_chaos seeded_random_chaos -- --nocapture
