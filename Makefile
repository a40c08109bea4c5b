# make run: install into .venv, migrate, start web + worker + clock (embedded defaults unless
# DATABASE_URL / REDIS_URL are set) on PORT (8000).  make test: install and run the tests.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
PORT ?= 8000
export PORT

.PHONY: install run stop-redis test bench clean

install: $(VENV)/.installed

$(VENV)/.installed: requirements.txt requirements-dev.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -r requirements-dev.txt
	touch $@

run: install
	$(BIN)/flask --app wsgi db upgrade
	@set -m; trap 'trap "" TERM; trap - INT EXIT; kill 0; exit 0' INT TERM EXIT; \
	PATH="$(CURDIR)/$(BIN):$$PATH"; \
	sh -c 'while :; do rq worker -c webchat.jobs.settings; sleep 5; done' & \
	sh -c 'while :; do rq cron -c webchat.jobs.settings webchat.jobs.cron; sleep 5; done' & \
	echo ""; echo "  webchat is running at http://127.0.0.1:$(PORT)/  (Ctrl+C stops it)"; echo ""; \
	gunicorn -c webchat/gunicorn_conf.py wsgi:app

# The embedded Redis (no REDIS_URL) keeps running between runs and is reused; this stops it.
stop-redis: install
	@$(BIN)/python -c "from webchat.embedded import stop_instance_redis as s; print('stopped' if s('instance') else 'no embedded Redis running')"

test: install
	@if [ -z "$$WEBCHAT_BROWSER" ] && [ ! -x /usr/bin/chromium ] && [ ! -d "$$HOME/.cache/ms-playwright" ]; then \
	  echo ""; echo "!!! No Chromium found: browser tests will be SKIPPED (apt-get install -y chromium) !!!"; echo ""; fi
	$(BIN)/python -m pytest $(PYTEST_ARGS)

bench: install
	$(BIN)/pip install -q -r bench/requirements.txt
	$(BIN)/python -m bench $(BENCH_ARGS)

clean:
	rm -rf $(VENV) instance .pytest_cache
