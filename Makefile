# Each target installs what it needs: Debian packages (as root) and a virtualenv in .venv.
VENV := .venv
APT_PACKAGES := dnsmasq-base dnsmasq-utils nftables haproxy strongswan-swanctl charon-systemd \
	libcharon-extra-plugins libcharon-extauth-plugins libstrongswan-standard-plugins radvd \
	isc-dhcp-client ndisc6 iproute2 iputils-ping iperf3 util-linux python3-venv make patch \
	nmap busybox dhcpcd-base bind9-dnsutils prometheus tcpdump curl cloud-init wget wrk
DEMO_DIR := /tmp/vr-demo-$(shell echo $$PPID)

.PHONY: demo test deps apt venv lint bench clean

demo: deps
	$(VENV)/bin/vr lab demo --dir $(DEMO_DIR)

test: deps
	$(VENV)/bin/ruff check .
	$(VENV)/bin/pytest -q -p no:cacheprovider tests

bench: deps
	$(VENV)/bin/python bench/large_router.py
	$(VENV)/bin/python bench/apply_scale.py
	$(VENV)/bin/python bench/firewall_scale.py
	$(VENV)/bin/python bench/lb_reload.py
	$(VENV)/bin/python bench/vpn_scale.py
	$(VENV)/bin/python bench/recovery.py
	$(VENV)/bin/python bench/patch_zero_downtime.py
	$(VENV)/bin/python bench/metadata.py

deps: apt venv
	@# vr's own bytecode, as an installed package has it: a machine that sets PYTHONDONTWRITEBYTECODE
	@# would otherwise compile every module in every `vr` process (tens of ms each).
	@$(VENV)/bin/python -m compileall -q vr

apt:
	@# cloud-init is a client in the tests (a guest's CloudStack data source), never this machine's own:
	@# disabled before it is installed, so that no boot of this machine runs it.
	@mkdir -p /etc/cloud && touch /etc/cloud/cloud-init.disabled
	@missing=$$(for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	if [ -n "$$missing" ]; then \
		echo "installing Debian packages: $$missing"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing; \
	fi

venv: $(VENV)/.installed

$(VENV)/.installed: setup.py Makefile
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	# compat: the source tree on a .pth line, not an import hook that every `vr` start pays ~20 ms for
	$(VENV)/bin/pip install -q -e . --config-settings editable_mode=compat pytest ruff hypothesis
	touch $@

lint: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

clean:
	rm -rf $(VENV) build *.egg-info
