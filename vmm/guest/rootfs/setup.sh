#!/bin/sh
# Runs inside the freshly bootstrapped Debian tree (chroot) to make it the
# sandmesh base template: E2B's user `user` (uid 1000, passwordless sudo),
# a hostname, and a small footprint.
set -eu
useradd --create-home --uid 1000 --user-group --shell /bin/bash user
echo 'user ALL=(ALL:ALL) NOPASSWD: ALL' > /etc/sudoers.d/user
chmod 0440 /etc/sudoers.d/user
echo sandbox > /etc/hostname
printf '127.0.0.1\tlocalhost\n127.0.1.1\tsandbox\n::1\tlocalhost ip6-localhost ip6-loopback\n' > /etc/hosts
# pip installs system-wide, as in E2B's base image (Debian marks its
# Python externally managed, PEP 668, and pip would refuse).
printf '[global]\nbreak-system-packages = true\n' > /etc/pip.conf
# The sandbox's resolver is set by the runtime at start.
: > /etc/resolv.conf
apt-get clean
rm -rf /var/lib/apt/lists/* /var/cache/apt/*.bin /var/log/*.log /usr/share/doc/* /usr/share/man/* /usr/share/info/*
