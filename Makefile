# pop3srv: `make run` serves a demo maildrop on 127.0.0.1 (1110 with STLS, 1995 implicit TLS);
# `make test` runs the suite.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
DEMO := .demo
RUN_PORT ?= 1110
RUN_TLS_PORT ?= 1995

.PHONY: install run demo test lint bench wheel-test clean

$(STAMP): setup.cfg pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# compat mode: a PEP 660 editable install would hide twisted/plugins/ from Twisted's scan
	$(BIN)/python -m pip install -q --config-settings editable_mode=compat -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m pop3srv.admin.demo $(DEMO)

run: demo
	$(BIN)/twistd --nodaemon --pidfile= --logfile=- pop3srv \
	    --listen tcp:$(RUN_PORT):interface=127.0.0.1 \
	    --listen-tls tcp:$(RUN_TLS_PORT):interface=127.0.0.1 \
	    --tls-cert $(DEMO)/tls.crt --tls-key $(DEMO)/tls.key \
	    --auth passlib:$(DEMO)/users \
	    --mailbox '$(CURDIR)/$(DEMO)/mail/{user}' \
	    --index-dir $(DEMO)/mail

test: $(STAMP)
	$(BIN)/python -m pytest -q -p no:cacheprovider tests

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/mypy pop3srv

# make bench: full run (< 30 min); make bench BENCH_ARGS=--quick (< 3 min). Installs
# dovecot-pop3d with apt-get when missing and possible (root), else measures pop3srv alone.
bench: $(STAMP)
	$(BIN)/python tests/bench/run.py $(BENCH_ARGS)

clean:
	rm -rf $(VENV) $(DEMO) build dist *.egg-info
