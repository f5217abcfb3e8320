# Every target runs scripts/bootstrap first, then works inside the environment it writes.
SHELL := /bin/bash
ENV := source .env &&

.PHONY: bootstrap build test demo demo-chat bench lint

bootstrap:
	@scripts/bootstrap

build: bootstrap
	@$(ENV) cargo build --release --bins

test: bootstrap
	@$(ENV) scripts/test

demo: bootstrap build
	@$(ENV) scripts/demo

demo-chat: demo
	@$(ENV) scripts/demo-chat

bench: bootstrap build
	@$(ENV) scripts/bench

lint: bootstrap
	@$(ENV) cargo fmt --all -- --check && $(ENV) cargo clippy --all-targets -- -D warnings
