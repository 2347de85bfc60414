#!/bin/sh
# local.sh: example flotilla hook, run inside the new guest.
#
#   local.sh check   on the host, before the build: validate the options; change nothing
#   local.sh run     copied into the guest and run with chroot (FLOTILLA_ROOT=/), after
#                    pre.sh and before freebsd-update
#
# Options (FLOTILLA_OPT_<KEY>):
#   ssh_pubkey         required: one or more OpenSSH public keys, one per line, for
#                      ssh_user (the guest's sshd takes keys only, and no root login)
#   ssh_user           the login made for them, in group wheel (default admin); doas or
#                      sudo, when installed, lets wheel become root
#   timezone           a zoneinfo name (default UTC)
#   tailscale=yes      enable tailscaled and a one-shot rc script that runs
#                      `tailscale up --auth-key=file:...` at first boot, then deletes the key
#                      pre.sh placed; tailscale_up_flags adds flags (e.g. --ssh),
#                      tailscale_timeout bounds the wait in seconds (default 60)
#   wireguard_address  WireGuard on: the interface address(es), e.g. 10.66.0.5/32;
#                      then required: wireguard_peer_public_key, wireguard_endpoint
#                      (host:port), wireguard_allowed_ips; optional wireguard_keepalive
#                      (seconds, default 25). The private key comes from pre.sh or is
#                      generated here; post.sh hands the public key to the host.
#   appjail=yes        install and configure AppJail, fetch its release, create its network
#
# Packages are expected from the package list (pkg.lst: pkg, doas, tailscale,
# wireguard-tools, appjail); a missing one is installed with pkg when pkg is there.

set -u
HOOK=local.sh
EX_USAGE=64
EX_DATAERR=65
EX_NOINPUT=66
EX_UNAVAILABLE=69

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

# matches KEY ERE: true when the option's value, as one line, matches the ERE.
matches() {
	case $(opt "$1") in *'
'*) return 1 ;; esac
	opt "$1" | grep -Eq "$2"
}

SSH_KEY_ERE='^(ssh-ed25519|ssh-rsa|ecdsa-sha2-nistp(256|384|521)|sk-ssh-ed25519@openssh\.com|sk-ecdsa-sha2-nistp256@openssh\.com) [A-Za-z0-9+/]+={0,3}( [^[:cntrl:]]*)?$'

check() {
	keys=$(opt ssh_pubkey)
	if [ -z "$keys" ]; then
		bad ssh_pubkey "required: the guest accepts only key logins, so without a key nobody could log in"
	elif printf '%s\n' "$keys" | grep -v '^[[:space:]]*$' | grep -Evq "$SSH_KEY_ERE"; then
		bad ssh_pubkey "every line must be an OpenSSH public key (type, base64, optional comment)"
	fi
	matches ssh_user '^[a-z_][a-z0-9_-]{0,15}$' || [ -z "$(opt ssh_user)" ] ||
		bad ssh_user "a login name: lower-case letters, digits, '_' and '-', at most 16"
	case $(opt ssh_user) in root | toor) bad ssh_user "must not be root" ;; esac
	matches timezone '^[A-Za-z0-9_+-]+(/[A-Za-z0-9_+-]+)*$' || [ -z "$(opt timezone)" ] ||
		bad timezone "a zoneinfo name such as UTC or America/Caracas"
	check_bool tailscale
	check_bool appjail
	matches tailscale_up_flags '^[A-Za-z0-9=:,./@_ -]*$' || [ -z "$(opt tailscale_up_flags)" ] ||
		bad tailscale_up_flags "flags for tailscale up: letters, digits and = : , . / @ _ -"
	matches tailscale_timeout '^[1-9][0-9]{0,3}$' || [ -z "$(opt tailscale_timeout)" ] ||
		bad tailscale_timeout "seconds, 1 to 9999"
	if [ -n "$(opt wireguard_address)" ]; then
		matches wireguard_address '^[0-9A-Fa-f:.]+/[0-9]{1,3}(, *[0-9A-Fa-f:.]+/[0-9]{1,3})*$' ||
			bad wireguard_address "address/prefix, comma separated (10.66.0.5/32)"
		matches wireguard_peer_public_key '^[A-Za-z0-9+/]{42}[AEIMQUYcgkosw048]=$' ||
			bad wireguard_peer_public_key "required with wireguard_address: the peer's base64 public key"
		matches wireguard_endpoint '^([A-Za-z0-9.-]+|\[[0-9A-Fa-f:.]+\]):[0-9]{1,5}$' ||
			bad wireguard_endpoint "required with wireguard_address: host:port"
		matches wireguard_allowed_ips '^[0-9A-Fa-f:.]+/[0-9]{1,3}(, *[0-9A-Fa-f:.]+/[0-9]{1,3})*$' ||
			bad wireguard_allowed_ips "required with wireguard_address: prefixes, comma separated"
		matches wireguard_keepalive '^[0-9]{1,5}$' || [ -z "$(opt wireguard_keepalive)" ] ||
			bad wireguard_keepalive "seconds"
	else
		for k in wireguard_peer_public_key wireguard_endpoint wireguard_allowed_ips wireguard_keepalive; do
			[ -z "$(opt "$k")" ] || bad "$k" "given without wireguard_address"
		done
	fi
	[ "$PROBLEMS" -eq 0 ] || exit "$EX_USAGE"
}

# need PACKAGE FILE: make sure PACKAGE (which provides FILE) is installed.
need() {
	[ -e "$2" ] && return 0
	[ -x /usr/local/sbin/pkg ] ||
		die "$EX_UNAVAILABLE" "$1 is not installed and pkg is missing: add pkg and $1 to pkg.lst"
	log "installing $1 (add it to pkg.lst to save this step)"
	pkg install -y "$1" >&2 || exit
}

# release: the guest's userland release without its patch level (14.2-RELEASE).
release() {
	release_v=$(freebsd-version -u) || exit
	printf '%s' "${release_v%%-p[0-9]*}"
}

setup_timezone() {
	tz=$(opt timezone UTC)
	[ -f "/usr/share/zoneinfo/$tz" ] || die "$EX_DATAERR" "timezone $tz: no /usr/share/zoneinfo/$tz"
	ln -fs "/usr/share/zoneinfo/$tz" /etc/localtime || exit
	printf '%s\n' "$tz" >/var/db/zoneinfo || exit
	log "timezone $tz"
}

setup_ssh_user() {
	user=$(opt ssh_user admin)
	if pw usershow -n "$user" >/dev/null 2>&1; then
		uid=$(pw usershow -n "$user" | cut -d: -f3)
		[ "$uid" -ge 1000 ] || die "$EX_DATAERR" "ssh_user $user is a system account"
		pw groupmod wheel -m "$user" || exit
	else
		pw useradd -n "$user" -m -G wheel -s /bin/sh -c "flotilla login" -h - || exit
	fi
	home=$(pw usershow -n "$user" | cut -d: -f9)
	install -d -m 0700 -o "$user" -g "$user" "$home/.ssh" || exit
	opt ssh_pubkey | grep -v '^[[:space:]]*$' >"$home/.ssh/authorized_keys" || exit
	chown "$user:$user" "$home/.ssh/authorized_keys" && chmod 0600 "$home/.ssh/authorized_keys" || exit
	if [ -x /usr/local/bin/doas ]; then
		conf=/usr/local/etc/doas.conf
		grep -qx 'permit nopass :wheel' "$conf" 2>/dev/null ||
			printf '%s\n' 'permit nopass :wheel' >>"$conf" || exit
		chmod 0600 "$conf" || exit
	elif [ -x /usr/local/bin/sudo ]; then
		mkdir -p /usr/local/etc/sudoers.d || exit
		printf '%s\n' '%wheel ALL=(ALL:ALL) NOPASSWD: ALL' >/usr/local/etc/sudoers.d/wheel || exit
		chmod 0440 /usr/local/etc/sudoers.d/wheel || exit
	else
		log "neither doas nor sudo is installed: $user can log in but not become root"
	fi
	log "ssh login $user with $(opt ssh_pubkey | grep -cv '^[[:space:]]*$') key(s)"
}

setup_tailscale() {
	need tailscale /usr/local/bin/tailscale
	[ -f /var/db/flotilla/tailscale-auth-key ] ||
		die "$EX_NOINPUT" "no auth key in /var/db/flotilla (pre.sh places it)"
	script=/usr/local/etc/rc.d/flotilla_tailscale_up
	cat >"$script" <<'EOF' || exit
#!/bin/sh
#
# PROVIDE: flotilla_tailscale_up
# REQUIRE: tailscaled
#
# Joins the tailnet once, with the auth key flotilla left in the image, then deletes
# the key and disables itself. The key reaches tailscale as a file name, never in argv.

. /etc/rc.subr

name=flotilla_tailscale_up
rcvar=flotilla_tailscale_up_enable
desc="Join the tailnet at first boot"
start_cmd="${name}_start"
stop_cmd=":"

load_rc_config "$name"
: "${flotilla_tailscale_up_enable:=NO}"
: "${flotilla_tailscale_up_key:=/var/db/flotilla/tailscale-auth-key}"
: "${flotilla_tailscale_up_flags:=}"
: "${flotilla_tailscale_up_timeout:=60}"

flotilla_tailscale_up_start()
{
	[ -f "$flotilla_tailscale_up_key" ] || return 0
	# shellcheck disable=SC2086 # the flags split into words
	if /usr/local/bin/tailscale up --auth-key="file:$flotilla_tailscale_up_key" \
	    --timeout="${flotilla_tailscale_up_timeout}s" $flotilla_tailscale_up_flags; then
		rm -f "$flotilla_tailscale_up_key"
		sysrc -x flotilla_tailscale_up_enable flotilla_tailscale_up_flags \
		    flotilla_tailscale_up_timeout >/dev/null 2>&1
		echo "Joined the tailnet; the auth key is deleted."
	else
		warn "tailscale up failed; the auth key stays for the next boot"
	fi
}

run_rc_command "$1"
EOF
	chmod 0555 "$script" || exit
	sysrc tailscaled_enable=YES flotilla_tailscale_up_enable=YES \
		"flotilla_tailscale_up_timeout=$(opt tailscale_timeout 60)" >/dev/null || exit
	flags=$(opt tailscale_up_flags)
	[ -z "$flags" ] || sysrc "flotilla_tailscale_up_flags=$flags" >/dev/null || exit
	log "Tailscale: joins the tailnet at first boot"
}

setup_wireguard() {
	need wireguard-tools /usr/local/bin/wg
	dir=/usr/local/etc/wireguard
	install -d -m 0700 "$dir" || exit
	if [ ! -s "$dir/wg0.key" ]; then
		(umask 077 && wg genkey >"$dir/wg0.key") || exit
		log "WireGuard: generated a private key"
	fi
	wg pubkey <"$dir/wg0.key" >"$dir/wg0.pub" || exit
	private=$(cat "$dir/wg0.key") || exit
	(
		umask 077
		cat >"$dir/wg0.conf" <<EOF
[Interface]
Address = $(opt wireguard_address)
PrivateKey = $private

[Peer]
PublicKey = $(opt wireguard_peer_public_key)
Endpoint = $(opt wireguard_endpoint)
AllowedIPs = $(opt wireguard_allowed_ips)
PersistentKeepalive = $(opt wireguard_keepalive 25)
EOF
	) || exit
	rm -f "$dir/wg0.key" || exit
	sysrc wireguard_enable=YES wireguard_interfaces=wg0 >/dev/null || exit
	log "WireGuard: wg0 $(opt wireguard_address) to $(opt wireguard_endpoint)"
}

setup_appjail() {
	need appjail /usr/local/bin/appjail
	rel=$(release)
	conf=/usr/local/etc/appjail/appjail.conf
	if [ ! -f "$conf" ]; then
		mkdir -p /usr/local/etc/appjail || exit
		cat >"$conf" <<EOF || exit
EXT_IF=vtnet0
FREEBSD_VERSION=$rel
FREEBSD_ARCH=$(uname -m)
IMAGE_ARCH=$(uname -m)
SHORTEN_DOMAIN_NAMES=1
EOF
	fi
	appjail fetch >&2 || exit
	appjail network auto-create >&2 || exit
	sysrc appjail_enable=YES appjail_natnet_enable=YES appjail_health_enable=YES \
		gateway_enable=YES >/dev/null || exit
	sysrc -f /boot/loader.conf kern.racct.enable=1 >/dev/null || exit
	log "AppJail: $rel fetched, network ready"
}

run() {
	[ "${FLOTILLA_ROOT:-}" = / ] || die "$EX_USAGE" "run belongs inside the guest (chroot)"
	setup_timezone
	setup_ssh_user
	if on tailscale; then setup_tailscale; fi
	if [ -n "$(opt wireguard_address)" ]; then setup_wireguard; fi
	if on appjail; then setup_appjail; fi
}

case ${1-} in
check) check ;;
run) run ;;
*) die "$EX_USAGE" "usage: $HOOK check|run" ;;
esac
