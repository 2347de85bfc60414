#!/bin/sh
# post.sh: example flotilla hook, host side, run by host/provision/provision.sh.
#
#   post.sh check   validate the options this hook needs; change nothing
#   post.sh run     cwd = the mounted guest root ($FLOTILLA_ROOT), after freebsd-update
#
# Options (FLOTILLA_OPT_<KEY>):
#   appjail=yes         bring the AppJail releases local.sh fetched up to date with
#                       freebsd-update (skipped when the build skips freebsd-update)
#   wireguard_address   when set: copy the guest's WireGuard public key to
#                       $FLOTILLA_VM_DIR/wireguard.pub, so the operator can add the peer
#                       on the server

set -u
HOOK=post.sh
EX_USAGE=64

log() { printf '%s: %s\n' "$HOOK" "$*" >&2; }
die() {
	die_rc=$1
	shift
	log "$*"
	exit "$die_rc"
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

check() {
	case $(opt appjail no) in
	[Yy][Ee][Ss] | [Tt][Rr][Uu][Ee] | [Oo][Nn] | 1 | [Nn][Oo] | [Ff][Aa][Ll][Ss][Ee] | [Oo][Ff][Ff] | 0) ;;
	*)
		log "option appjail: must be yes or no"
		exit "$EX_USAGE"
		;;
	esac
	[ -n "${FLOTILLA_VM_DIR:-}" ] || die "$EX_USAGE" "FLOTILLA_VM_DIR is not set"
}

run() {
	[ "$(pwd -P)" = "$(cd "$FLOTILLA_ROOT" && pwd -P)" ] || die "$EX_USAGE" "not run from the guest root"

	if on appjail && [ "${FLOTILLA_FREEBSD_UPDATE:-yes}" = yes ]; then
		for rel in usr/local/appjail/releases/*/*/*/release; do
			[ -d "$rel" ] || continue
			version=$(printf '%s' "$rel" | cut -d/ -f6)
			log "AppJail: updating release $version"
			env PAGER=cat freebsd-update --not-running-from-cron -b "$PWD/$rel" \
				-d "$PWD/$rel/var/db/freebsd-update" -f "$PWD/etc/freebsd-update.conf" \
				--currently-running "$version" fetch install || exit
		done
	fi

	if [ -n "$(opt wireguard_address)" ]; then
		pub=usr/local/etc/wireguard/wg0.pub
		[ -s "$pub" ] || die 66 "no $pub (local.sh writes it)"
		cp "$pub" "$FLOTILLA_VM_DIR/wireguard.pub" || exit
		log "WireGuard: public key $(cat "$pub") saved to $FLOTILLA_VM_DIR/wireguard.pub"
	fi
}

case ${1-} in
check) check ;;
run) run ;;
*) die "$EX_USAGE" "usage: $HOOK check|run" ;;
esac
