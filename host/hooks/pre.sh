#!/bin/sh
# pre.sh: example flotilla hook, host side, run by host/provision/provision.sh.
#
#   pre.sh check   validate the options this hook needs; change nothing
#   pre.sh run     cwd = the mounted guest root ($FLOTILLA_ROOT), after pkg and hostname
#
# It does what needs the host: it copies secret files into the guest (the chroot cannot
# see the host's paths) and seeds AppJail's cache with the host's release files.
#
# Options (FLOTILLA_OPT_<KEY>):
#   tailscale=yes             copy the secret named by tailscale_secret (default
#                             tailscale_auth_key) to /var/db/flotilla/tailscale-auth-key
#                             in the guest, mode 0600; local.sh makes the guest join the
#                             tailnet with it at first boot and delete it
#   wireguard_address=...     WireGuard on: if the secret named by wireguard_secret
#                             (default wireguard_private_key) exists, it becomes the
#                             guest's private key; without it local.sh generates one
#   appjail=yes               copy $FLOTILLA_COMPONENTS/*.txz into AppJail's cache so
#                             `appjail fetch` in local.sh needs no download
#
# Secrets arrive as paths (FLOTILLA_SECRET_<NAME>); this hook copies them with install(1)
# and never prints them.

set -u
HOOK=pre.sh
EX_USAGE=64
EX_NOINPUT=66

log() { printf '%s: %s\n' "$HOOK" "$*" >&2; }
die() {
	die_rc=$1
	shift
	log "$*"
	exit "$die_rc"
}

PROBLEMS=0
bad() {
	log "option $1: $2"
	PROBLEMS=$((PROBLEMS + 1))
}

# opt key [DEFAULT]: the option's value (FLOTILLA_OPT_KEY, the key upper-cased), or
# DEFAULT when unset or empty.
opt() {
	opt_key=$(printf '%s' "$1" | tr '[:lower:]' '[:upper:]')
	eval "opt_value=\${FLOTILLA_OPT_$opt_key-}"
	# shellcheck disable=SC2154 # set by the eval above
	if [ -n "$opt_value" ]; then printf '%s' "$opt_value"; else printf '%s' "${2-}"; fi
}

# on KEY: true when the option is yes (yes/true/on/1), false when no or unset.
on() {
	case $(opt "$1" no) in
	[Yy][Ee][Ss] | [Tt][Rr][Uu][Ee] | [Oo][Nn] | 1) return 0 ;;
	*) return 1 ;;
	esac
}

check_bool() {
	case $(opt "$1" no) in
	[Yy][Ee][Ss] | [Tt][Rr][Uu][Ee] | [Oo][Nn] | 1 | [Nn][Oo] | [Ff][Aa][Ll][Ss][Ee] | [Oo][Ff][Ff] | 0) ;;
	*) bad "$1" "must be yes or no" ;;
	esac
}

# secret_path NAME: the path the worker passed for secret NAME (empty when none).
secret_path() {
	secret_var=FLOTILLA_SECRET_$(printf '%s' "$1" | tr '[:lower:]' '[:upper:]' | sed 's/[^A-Z0-9]/_/g')
	eval "printf '%s' \"\${$secret_var-}\""
}

check_secret_name() {
	case $(opt "$1" "$2") in
	*[!A-Za-z0-9_.-]*) bad "$1" "a secret name is letters, digits, '.', '_' and '-'" ;;
	esac
}

check() {
	check_bool tailscale
	check_bool appjail
	check_secret_name tailscale_secret tailscale_auth_key
	check_secret_name wireguard_secret wireguard_private_key
	if on tailscale; then
		ts_name=$(opt tailscale_secret tailscale_auth_key)
		ts_path=$(secret_path "$ts_name")
		if [ -z "$ts_path" ]; then
			bad tailscale "needs the secret '$ts_name' (the auth key), which the VM does not name"
		elif [ ! -f "$ts_path" ] || [ ! -r "$ts_path" ] || [ ! -s "$ts_path" ]; then
			bad tailscale "secret '$ts_name' is not a readable, non-empty file: $ts_path"
		fi
	fi
	if [ -n "$(opt wireguard_address)" ] && [ -n "$(opt wireguard_secret)" ]; then
		wg_name=$(opt wireguard_secret)
		wg_path=$(secret_path "$wg_name")
		if [ -z "$wg_path" ] || [ ! -f "$wg_path" ] || [ ! -r "$wg_path" ]; then
			bad wireguard_secret "the secret '$wg_name' is not a readable file"
		fi
	fi
	if on appjail && [ ! -f "${FLOTILLA_COMPONENTS:-}/base.txz" ]; then
		bad appjail "no base.txz in FLOTILLA_COMPONENTS (${FLOTILLA_COMPONENTS:-unset})"
	fi
	[ "$PROBLEMS" -eq 0 ] || exit "$EX_USAGE"
}

run() {
	[ "$(pwd -P)" = "$(cd "$FLOTILLA_ROOT" && pwd -P)" ] || die "$EX_USAGE" "not run from the guest root"

	if on tailscale; then
		ts_path=$(secret_path "$(opt tailscale_secret tailscale_auth_key)")
		[ -f "$ts_path" ] || die "$EX_NOINPUT" "the Tailscale auth key file is gone"
		install -d -m 0700 var/db/flotilla || exit
		install -m 0600 "$ts_path" var/db/flotilla/tailscale-auth-key || exit
		log "Tailscale: auth key placed for the first boot"
	fi

	if [ -n "$(opt wireguard_address)" ]; then
		wg_path=$(secret_path "$(opt wireguard_secret wireguard_private_key)")
		if [ -n "$wg_path" ] && [ -f "$wg_path" ]; then
			install -d -m 0700 usr/local/etc/wireguard || exit
			install -m 0600 "$wg_path" usr/local/etc/wireguard/wg0.key || exit
			log "WireGuard: private key placed from the secret"
		fi
	fi

	if on appjail; then
		release=$(bin/freebsd-version -u) || exit
		release=${release%%-p[0-9]*}
		cache=usr/local/appjail/cache/components/$(uname -m)/$release/default
		mkdir -p "$cache" || exit
		for f in "$FLOTILLA_COMPONENTS"/*.txz "$FLOTILLA_COMPONENTS"/MANIFEST; do
			[ ! -f "$f" ] || cp "$f" "$cache/" || exit
		done
		log "AppJail: $release components cached"
	fi
}

case ${1-} in
check) check ;;
run) run ;;
*) die "$EX_USAGE" "usage: $HOOK check|run" ;;
esac
