# LoLDU — every command a user or CI needs. `make demo` and `make test` work on a fresh machine:
# they install what is missing (Debian packages, Python packages), build, and run.

SHELL := /bin/bash
PREFIX ?= /usr/local
BUILD := build
# Python runs in a virtual environment, build/venv, that sees the system's packages (a torch
# already installed is not downloaded again) and installs what is missing into itself, never
# into the system's Python (PEP 668). PYTHON=/path/to/python uses that interpreter as it is.
HOST_PYTHON ?= python3
VENV := $(BUILD)/venv
PYTHON ?= $(CURDIR)/$(VENV)/bin/python
LIBDIR := $(CURDIR)/.build/release
LIB := $(LIBDIR)/libloldu.so
VERSION := $(shell sed -n 's/^\#define LOLDU_VERSION_STRING "\(.*\)"/\1/p' include/loldu.h)
# The ABI's name: libloldu.so.MAJOR, or libloldu.so.0.MINOR while the major version is 0.
SONAME := libloldu.so.$(shell echo $(VERSION) | awk -F. '{ print ($$1 == 0 ? $$1 "." $$2 : $$1) }')

# Debian's OpenBLAS 0.3.21 does not recognise recent Intel cores and falls back to its slowest
# kernels (Prescott); name the right family unless the caller already chose one.
ifeq ($(origin OPENBLAS_CORETYPE), undefined)
OPENBLAS_CORETYPE := $(shell grep -qw avx512f /proc/cpuinfo 2>/dev/null && echo SkylakeX || \
                       (grep -qw avx2 /proc/cpuinfo 2>/dev/null && echo Haswell))
endif
ifneq ($(OPENBLAS_CORETYPE),)
export OPENBLAS_CORETYPE
endif

APT_PACKAGES := pkg-config libopenblas-dev liblapacke-dev libdnnl-dev
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: all setup build test test-swift test-c test-install test-fuzz test-tsan test-examples fuzz demo compare study bench install uninstall clean FORCE
COMMA := ,

all: build

include bindings/python/python.mk

# --- setup: install what is missing ---------------------------------------------------------
# $(call apt_install,PACKAGES): installs those of the Debian packages that are missing.
apt_install = @missing=$$(for p in $(1); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	if [ -n "$$missing" ]; then \
	  echo "installing:" $$missing; \
	  $(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq $$missing; \
	fi

$(BUILD)/.apt-ready:
	$(call apt_install,$(APT_PACKAGES))
	@mkdir -p $(BUILD) && touch $@

setup: $(BUILD)/.apt-ready

# --- build: libloldu.so with the Swift runtime linked in, exporting only loldu_* ---------------
# Always asks SwiftPM, which rebuilds only what changed (sources or flags): a `swift test -c release`
# by hand relinks .build/release/libloldu.so without -static-stdlib, and a timestamp would miss it.
# Programs linked against it load it by its SONAME, a link next to it.
NEED_SWIFT = @command -v swift >/dev/null || { echo "error: building needs a Swift 6 toolchain, swift on the PATH (https://www.swift.org/install/linux/)"; exit 1; }
$(LIB): FORCE | $(BUILD)/.apt-ready
	$(NEED_SWIFT)
	swift build -c release --product loldu -Xswiftc -static-stdlib \
	  -Xlinker --version-script=$(CURDIR)/Sources/LoLDUCAPI/exports.map -Xlinker -soname=$(SONAME)
	@if ldd $@ | grep -q libswift; then echo "error: $@ links the Swift runtime dynamically"; exit 1; fi
	@ln -sf libloldu.so $(LIBDIR)/$(SONAME)

# The `loldu` command-line tool, the library and the Swift runtime linked in.
CLI := $(BUILD)/bin/loldu
$(CLI): FORCE | $(BUILD)/.apt-ready
	$(NEED_SWIFT)
	swift build -c release --product loldu-cli -Xswiftc -static-stdlib
	@mkdir -p $(BUILD)/bin && cp -p .build/release/loldu-cli $@
	@if ldd $@ | grep -q libswift; then echo "error: $@ links the Swift runtime dynamically"; exit 1; fi

# loldu.pc for using the library from this checkout (with an rpath, so no LD_LIBRARY_PATH).
$(BUILD)/loldu.pc: loldu.pc.in include/loldu.h | $(BUILD)/.apt-ready
	sed -e 's|@PREFIX@|$(CURDIR)|' -e 's|@LIBDIR@|$(LIBDIR)|' -e 's|@INCLUDEDIR@|$(CURDIR)/include|' \
	    -e 's|@VERSION@|$(VERSION)|' -e 's|@RPATH@|-Wl,-rpath,$${libdir} |' $< > $@

build: $(LIB) $(CLI) $(BUILD)/loldu.pc

# --- tests -------------------------------------------------------------------------------------
CFLAGS_STRICT := -Wall -Wextra -Werror -pedantic

test: test-swift test-c test-fuzz test-tsan test-python test-examples

test-swift: $(BUILD)/.apt-ready
	swift test
	@echo "The Swift suite again with OpenBLAS on kernels older than the CPU, which sends float32 products to oneDNN:"
	OPENBLAS_CORETYPE=Prescott swift test

# The Swift suite again under ThreadSanitizer (its own build folder).
test-tsan: $(BUILD)/.apt-ready
	swift test --sanitize=thread --scratch-path .build-tsan

# C programs against the library, compiled through loldu.pc as a user would.
$(BUILD)/%: examples/c/%.c examples/c/check.h build
	cc -std=c11 $(CFLAGS_STRICT) -O2 $< $$(PKG_CONFIG_PATH=$(BUILD) pkg-config --cflags --libs loldu) -lm -o $@

$(BUILD)/faults: Tests/c/faults.c build
	cc -std=c11 $(CFLAGS_STRICT) -O2 $< $$(PKG_CONFIG_PATH=$(BUILD) pkg-config --cflags --libs loldu) -lm -o $@

$(BUILD)/backend: Tests/c/backend.c build
	cc -std=c11 $(CFLAGS_STRICT) -O2 $< $$(PKG_CONFIG_PATH=$(BUILD) pkg-config --cflags --libs loldu openblas) -lm -o $@

test-c: $(BUILD)/quickstart $(BUILD)/train $(BUILD)/serve $(BUILD)/faults $(BUILD)/backend
	cc -std=c11 $(CFLAGS_STRICT) -Iinclude -c Tests/c/header_check.c -o $(BUILD)/header_check_c.o
	c++ -std=c++17 $(CFLAGS_STRICT) -Iinclude -x c++ -c Tests/c/header_check.c -o $(BUILD)/header_check_cpp.o
	$(BUILD)/quickstart
	rm -rf $(BUILD)/train-checkpoint
	$(BUILD)/train $(BUILD)/train-checkpoint
	$(BUILD)/train --verify $(BUILD)/train-checkpoint
	$(BUILD)/serve
	$(BUILD)/faults
	$(BUILD)/backend
	$(MAKE) --no-print-directory test-install

# `make install` into a scratch prefix: the library carries its SONAME, a program built with the
# installed loldu.pc runs with no LD_LIBRARY_PATH, and `make uninstall` removes every file.
test-install: build
	rm -rf $(BUILD)/prefix
	$(MAKE) --no-print-directory install PREFIX=$(CURDIR)/$(BUILD)/prefix
	readelf -d $(BUILD)/prefix/lib/libloldu.so | grep -q 'SONAME.*\[$(SONAME)\]'
	cc -std=c11 $(CFLAGS_STRICT) -O2 examples/c/quickstart.c \
	  $$(PKG_CONFIG_PATH=$(BUILD)/prefix/lib/pkgconfig pkg-config --cflags --libs loldu) -lm -o $(BUILD)/quickstart-installed
	env -u LD_LIBRARY_PATH $(BUILD)/quickstart-installed
	$(MAKE) --no-print-directory uninstall PREFIX=$(CURDIR)/$(BUILD)/prefix
	@left=$$(find $(BUILD)/prefix -type f -o -type l); [ -z "$$left" ] || { echo "uninstall left: $$left"; exit 1; }

# --- fuzzing: the readers of untrusted bytes (safetensors, JSON, checkpoints, optimiser states) under libFuzzer and
# AddressSanitizer, compiled into the core module. `make test` runs a fixed number of runs from a
# fixed seed (repeatable); `make fuzz FUZZ_SECONDS=600` explores for longer.
FUZZ_RUNS ?= 100000
FUZZ_SECONDS ?= 300
FUZZ_CORPUS := $(BUILD)/fuzz-corpus

$(BUILD)/fuzz: fuzz/Fuzz.swift $(wildcard Sources/LoLDU/*.swift) | $(BUILD)/.apt-ready
	swiftc -sanitize=fuzzer,address -parse-as-library -O -module-name LoLDU -use-ld=lld \
	  -I Sources/CLinearAlgebra -I Sources/CLoLDU -I Sources/CDNNL $$(pkg-config --cflags-only-I openblas lapacke | sed 's/-I/-Xcc -I/g') \
	  Sources/LoLDU/*.swift fuzz/Fuzz.swift $$(pkg-config --libs openblas lapacke) -o $@

# Seeds: the checkpoint and optimiser state test-c writes, each file alone and the checkpoint's
# two files joined by a NUL (see fuzz/Fuzz.swift).
$(FUZZ_CORPUS): test-c
	mkdir -p $@
	cp $(BUILD)/train-checkpoint/adapter_config.json $(BUILD)/train-checkpoint/adapter_model.safetensors \
	   $(BUILD)/train-checkpoint/optimizer.safetensors $@/
	{ cat $@/adapter_config.json; printf '\0'; cat $@/adapter_model.safetensors; } > $@/checkpoint

test-fuzz: $(BUILD)/fuzz $(FUZZ_CORPUS)
	rm -rf $(BUILD)/fuzz-run && cp -r $(FUZZ_CORPUS) $(BUILD)/fuzz-run
	$(BUILD)/fuzz -runs=$(FUZZ_RUNS) -seed=1 -max_len=8192 -artifact_prefix=$(BUILD)/ $(BUILD)/fuzz-run

fuzz: $(BUILD)/fuzz $(FUZZ_CORPUS)
	$(BUILD)/fuzz -max_total_time=$(FUZZ_SECONDS) -max_len=8192 -artifact_prefix=$(BUILD)/ $(FUZZ_CORPUS)

# --- the main job: fine-tune all-MiniLM-L6-v2 on Rotten Tomatoes with LoLDU --------------------
# OMP_WAIT_POLICY=PASSIVE: PyTorch's OpenMP threads sleep when idle instead of spinning, so they
# do not fight libloldu's BLAS threads for the cores (see README, "Performance notes").
PY_RUN = LOLDU_LIBRARY=$(LIB) HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 OMP_WAIT_POLICY=PASSIVE $(PYTHON)

# The Python examples, short: two adapters trained on two tasks and served in one mixed batch;
# the study's finalists, each a few steps on a few sentences.
test-examples: build python-setup
	$(PY_RUN) examples/python/many_adapters.py --quick
	$(PY_RUN) examples/python/study.py --selftest

# DTYPE=bfloat16: the encoder in bf16 (bf16 GEMMs on CPUs with bf16 units).
DTYPE ?= float32
demo: build python-setup
	$(PY_RUN) examples/python/finetune_minilm.py --dtype $(DTYPE)

# LoLDU (r = 64, full rank) vs PEFT LoRA vs a linear probe vs full fine-tuning: docs/results.md
compare: build python-setup
	$(PY_RUN) examples/python/finetune_minilm.py --compare

# The learning-fidelity study: hours of CPU, resumable (docs/results.jsonl keeps finished
# runs; start it again to continue); rewrites the study section of docs/results.md.
study: build python-setup
	$(PY_RUN) examples/python/study.py $(STUDY_ARGS)

# --- benchmarks: one run, ratios against baselines measured in the same process ---------------
$(BUILD)/bench: bench/bench.c build
	cc -std=c11 -O2 -Wall -Wextra $< $$(PKG_CONFIG_PATH=$(BUILD) pkg-config --cflags --libs loldu openblas lapacke) -lm -o $@

bench: $(BUILD)/bench python-setup
	$(PY_RUN) bench/bench_torch.py --c-bench $(BUILD)/bench --out docs/benchmarks.md --png docs/benchmarks.png --readme README.md

# --- install -----------------------------------------------------------------------------------
# The library as libloldu.so.VERSION with its SONAME and development links, stripped; the
# installed loldu.pc gives programs an rpath to it unless PREFIX is /usr (the loader's own
# path), and as root ldconfig updates the loader's cache for /usr and /usr/local.
INSTALLED := bin/loldu lib/libloldu.so.$(VERSION) lib/$(SONAME) lib/libloldu.so include/loldu.h lib/pkgconfig/loldu.pc
install: build
	install -d $(DESTDIR)$(PREFIX)/bin $(DESTDIR)$(PREFIX)/lib $(DESTDIR)$(PREFIX)/include $(DESTDIR)$(PREFIX)/lib/pkgconfig
	install -m 755 -s $(LIB) $(DESTDIR)$(PREFIX)/lib/libloldu.so.$(VERSION)
	ln -sf libloldu.so.$(VERSION) $(DESTDIR)$(PREFIX)/lib/$(SONAME)
	ln -sf $(SONAME) $(DESTDIR)$(PREFIX)/lib/libloldu.so
	install -m 755 -s $(CLI) $(DESTDIR)$(PREFIX)/bin/loldu
	install -m 644 include/loldu.h $(DESTDIR)$(PREFIX)/include/
	sed -e 's|@PREFIX@|$(PREFIX)|' -e 's|@LIBDIR@|$${prefix}/lib|' -e 's|@INCLUDEDIR@|$${prefix}/include|' \
	    -e 's|@VERSION@|$(VERSION)|' -e 's|@RPATH@|$(if $(filter /usr,$(PREFIX)),,-Wl$(COMMA)-rpath$(COMMA)$${libdir} )|' \
	    loldu.pc.in > $(DESTDIR)$(PREFIX)/lib/pkgconfig/loldu.pc
	@if [ -z "$(DESTDIR)" ] && [ "$$(id -u)" = 0 ] && [ "$(filter /usr /usr/local,$(PREFIX))" ] && command -v ldconfig >/dev/null; then ldconfig; fi

uninstall:
	rm -f $(addprefix $(DESTDIR)$(PREFIX)/,$(INSTALLED))

clean:
	rm -rf $(BUILD) .build .build-tsan
