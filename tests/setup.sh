#!/usr/bin/env bash
# Installs what the test suite needs on a fresh Debian machine: ffmpeg (ffprobe decodes the
# rendered videos). Safe to run again; installs only what is missing.
set -euo pipefail
need=()
command -v ffprobe >/dev/null 2>&1 || need+=(ffmpeg)
if [ ${#need[@]} -gt 0 ]; then
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${need[@]}"
fi
