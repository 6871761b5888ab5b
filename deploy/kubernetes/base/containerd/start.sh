#!/bin/sh
# Starts the sessions' containerd, imports the image tarballs in
# /var/lib/sandfleet/images that it does not have yet (the pause and sandbox
# images: there is no registry), then waits on containerd.
set -eu
sock=/run/sandfleet/containerd/containerd.sock
containerd --config /etc/sandfleet/containerd/config.toml &
pid=$!
trap 'kill -TERM "$pid"; wait "$pid"' TERM INT
i=0
until ctr --address "$sock" version >/dev/null 2>&1; do
  i=$((i + 1))
  if [ "$i" -gt 300 ]; then echo "containerd did not answer within 30 s" >&2; exit 1; fi
  sleep 0.1
done
for tar in /var/lib/sandfleet/images/*.tar; do
  [ -e "$tar" ] || continue
  echo "importing $tar"
  ctr --address "$sock" --namespace k8s.io images import "$tar"
done
wait "$pid"
