#!/bin/sh
# provision.sh: flotilla's FreeBSD guest builder.
#
# The flotilla worker runs this on a FreeBSD host after `vm create -t TEMPLATE -s DISK NAME`
# made the guest's directory with its configuration and a sparse, empty disk0.img. The
# builder turns that image into a bootable FreeBSD system:
#
#   grow disk0.img by 8 MiB (room for the GPT and the boot partition), attach it with
#   mdconfig, partition it (freebsd-boot 512k with gptboot, freebsd-swap SWAP, freebsd-ufs
#   DISK - SWAP, all 1 MiB aligned), newfs -U the root, mount it, extract base.txz and
#   kernel.txz, mount devfs, copy the files/ overlay, write fstab for the template's disk
#   type, put the host's resolver in place, pkg install the package list, set the hostname,
#   run the hooks (pre.sh on the host, local.sh in a chroot), freebsd-update, post.sh on the
#   host, restore the guest's resolv.conf, unmount and detach.
#
# Usage (an argument vector, never a shell string):
#
#   provision.sh [-nU] -d GUEST_DIR [-z DISK] [-s SWAP] [-T DISK_TYPE] [-D DOMAIN]
#                [-c COMPONENTS_DIR] [-f FILES_DIR|none] [-p PKG_LIST|none]
#                [-H HOOKS_DIR|none] [-m MOUNT_BASE] [-r RESOLV_CONF] NAME
#
#   -n   dry run: print every step, run none of them (Linux is fine)
#   -U   skip freebsd-update
#   -d   the guest's directory, as vm-bhyve made it (default: $FLOTILLA_VM_DIR)
#   -z   disk size given to `vm create -s` (default: the image's current size)
#   -s   swap size, 0 for none (default 4G); sizes take k, m, g, t (binary), whole MiB
#   -T   nvme | virtio-blk | ahci-hd (default: disk0_type in GUEST_DIR/NAME.conf)
#   -D   domain appended to NAME for the hostname (default: none)
#   -c   directory with base.txz and kernel.txz (default /var/db/flotilla/components)
#   -f   overlay copied into the guest root (default /usr/local/share/flotilla/files)
#   -p   package list, one name per line, # comments (default
#        /usr/local/etc/flotilla/pkg.lst, skipped when that default is absent)
#   -H   hooks directory (default /usr/local/etc/flotilla/hooks, skipped when absent)
#   -m   where the guest root is mounted, as MOUNT_BASE/NAME (default /var/run/flotilla)
#   -r   resolver used inside the guest during the build (default /etc/resolv.conf)
#
# Environment. From the worker: FLOTILLA_OPT_<KEY> for every hook option of the VM (keys
# upper-cased, anything but A-Z 0-9 turned into _) and FLOTILLA_SECRET_<NAME>, the PATH of
# a secret file. The builder never reads a secret and never prints one; it only checks
# that the path is a readable file. The builder exports FLOTILLA_VM (NAME), FLOTILLA_VM_DIR,
# FLOTILLA_ROOT (the mounted guest root; "/" for local.sh), FLOTILLA_HOSTNAME,
# FLOTILLA_COMPONENTS and FLOTILLA_FREEBSD_UPDATE (yes, or no with -U) to the hooks.
#
# Hooks (each optional; run only when present and executable) are called with one
# argument, the phase:
#   check  all hooks, before anything is changed, also in a dry run: validate the
#          FLOTILLA_OPT_* and FLOTILLA_SECRET_* they need, change nothing, exit 64 when an
#          option is missing or bad. A hook must do nothing else in this phase.
#   run    pre.sh on the host with cwd = guest root; local.sh copied into the guest and run
#          with chroot; post.sh on the host with cwd = guest root.
#
# Output: every step is printed on stdout as "+ command", quoted for sh, before it runs
# (or instead of running, with -n; the md unit is then shown as md0 and the guest's release
# as X.Y-RELEASE). Messages go to stderr.
#
# Exit status: 0 built; 64 usage or a bad option (nothing changed); 65 bad data (disk type,
# package list, image size); 66 a missing input; 69 not FreeBSD (without -n); 73 the mount
# point is in use; 77 not root (without -n); 70 ended by a signal; otherwise the exit
# status of the step that failed.
#
# Failure: on any failure or signal the builder unmounts what it mounted and detaches the
# md device, then exits non-zero. It never runs `vm destroy`: the worker created the VM,
# so the worker destroys it when the builder fails, and a failed create leaves no
# half-made VM behind.

set -u
umask 022
LC_ALL=C
export LC_ALL
PATH=/sbin:/bin:/usr/sbin:/usr/bin:/usr/local/sbin:/usr/local/bin${PATH:+:$PATH}
export PATH

EX_USAGE=64
EX_DATAERR=65
EX_NOINPUT=66
EX_UNAVAILABLE=69
EX_SIGNAL=70
EX_CANTCREAT=73
EX_NOPERM=77

PAD_MIB=8                   # added to the image: GPT at both ends and the boot partition
MD_PLACEHOLDER=md0          # the md unit shown by a dry run
VERSION_PLACEHOLDER=X.Y-RELEASE
LOCAL_IN_GUEST=/tmp/flotilla-local.sh
RESOLV_SAVED=etc/resolv.conf.flotilla-saved

log() { printf 'provision: %s\n' "$*" >&2; }
die() {
	die_rc=$1
	shift
	log "$*"
	exit "$die_rc"
}

usage() {
	cat >&2 <<'EOF'
usage: provision.sh [-nU] -d GUEST_DIR [-z DISK] [-s SWAP] [-T DISK_TYPE] [-D DOMAIN]
                    [-c COMPONENTS_DIR] [-f FILES_DIR|none] [-p PKG_LIST|none]
                    [-H HOOKS_DIR|none] [-m MOUNT_BASE] [-r RESOLV_CONF] NAME
EOF
	exit "$EX_USAGE"
}

# --- printing and running steps -------------------------------------------------------

# quote WORD: WORD as sh would need it typed.
quote() {
	case $1 in
	'') printf "''" ;;
	*[!A-Za-z0-9_./:=@%+,^-]*) printf "'%s'" "$(printf '%s' "$1" | sed "s/'/'\\\\''/g")" ;;
	*) printf '%s' "$1" ;;
	esac
}

# show WORD...: print a step.
show() {
	show_line="+"
	for show_word; do
		show_line="$show_line $(quote "$show_word")"
	done
	printf '%s\n' "$show_line"
}

# run CMD...: print the step, then run it unless this is a dry run; a failure ends the
# build with the command's exit status.
run() {
	show "$@"
	[ "$DRY" -eq 1 ] && return 0
	"$@" || die $? "failed ($?): $*"
}

# capture PLACEHOLDER CMD...: like run, leaving the command's output in CAPTURED (the
# placeholder in a dry run).
capture() {
	CAPTURED=$1
	shift
	show "$@"
	[ "$DRY" -eq 1 ] && return 0
	CAPTURED=$("$@") || die $? "failed ($?): $*"
}

# write_lines FILE LINE...: write the lines to FILE, shown as the printf that does it.
write_lines() {
	write_file=$1
	shift
	write_shown="+ printf '%s\\n'"
	for write_line; do
		write_shown="$write_shown $(quote "$write_line")"
	done
	printf '%s > %s\n' "$write_shown" "$(quote "$write_file")"
	[ "$DRY" -eq 1 ] && return 0
	printf '%s\n' "$@" >"$write_file" || die $? "failed ($?): writing $write_file"
}

# in_root_hook HOOK: run a host-side hook with cwd = the guest root.
in_root_hook() {
	printf '+ (cd %s && %s run)\n' "$(quote "$ROOT")" "$(quote "$1")"
	[ "$DRY" -eq 1 ] && return 0
	(cd "$ROOT" && exec "$1" run) || die $? "hook $1 failed ($?)"
}

# --- cleanup --------------------------------------------------------------------------

MD=""
MNT_MADE=0
ROOT_MOUNTED=0
DEVFS_MOUNTED=0

# The functions below run from the traps, which shellcheck 0.9 does not follow (SC2317).

# undo CMD...: a cleanup step; its failure is reported, not fatal.
# shellcheck disable=SC2317
undo() {
	show "$@"
	[ "$DRY" -eq 1 ] && return 0
	"$@" || log "cleanup: failed ($?): $*"
}

# shellcheck disable=SC2317
cleanup() {
	if [ "$DEVFS_MOUNTED" -eq 1 ]; then
		undo umount -f "$ROOT/dev"
		DEVFS_MOUNTED=0
	fi
	if [ "$ROOT_MOUNTED" -eq 1 ]; then
		undo umount -f "$ROOT"
		ROOT_MOUNTED=0
	fi
	if [ "$MNT_MADE" -eq 1 ]; then
		undo rmdir "$ROOT"
		MNT_MADE=0
	fi
	if [ -n "$MD" ]; then
		undo mdconfig -d -u "$MD" -o force
		MD=""
	fi
}

# shellcheck disable=SC2317
on_exit() {
	on_exit_rc=$?
	trap '' HUP INT QUIT TERM XCPU XFSZ
	if [ "$on_exit_rc" -ne 0 ]; then
		if [ -n "$MD" ] || [ "$MNT_MADE" -eq 1 ]; then
			log "cleaning up; the worker destroys the VM"
		fi
		cleanup
	fi
	exit "$on_exit_rc"
}

# shellcheck disable=SC2317
on_signal() {
	log "interrupted by a signal"
	exit "$EX_SIGNAL"
}

# --- parsing helpers ------------------------------------------------------------------

# to_mib SIZE: SIZE (N, Nk, Nm, Ng, Nt; binary units) in MiB; fails unless whole MiB.
to_mib() {
	to_mib_num=${1%[kKmMgGtT]}
	to_mib_unit=${1#"$to_mib_num"}
	case $to_mib_num in '' | *[!0-9]*) return 1 ;; esac
	while :; do
		case $to_mib_num in
		0?*) to_mib_num=${to_mib_num#0} ;;
		*) break ;;
		esac
	done
	[ "${#to_mib_num}" -le 13 ] || return 1
	case $to_mib_unit in
	'')
		[ $((to_mib_num % 1048576)) -eq 0 ] || return 1
		echo $((to_mib_num / 1048576))
		;;
	k | K)
		[ $((to_mib_num % 1024)) -eq 0 ] || return 1
		echo $((to_mib_num / 1024))
		;;
	m | M) echo $((to_mib_num)) ;;
	g | G) echo $((to_mib_num * 1024)) ;;
	t | T) echo $((to_mib_num * 1048576)) ;;
	*) return 1 ;;
	esac
}

# conf_value FILE KEY: the last value of KEY="value" in a vm-bhyve configuration.
conf_value() {
	sed -n "s/^$2=\"\\{0,1\\}\\([^\"]*\\)\"\\{0,1\\}[[:space:]]*\$/\\1/p" "$1" | tail -n 1
}

# absolute PATH: PATH made absolute (the hooks run from other directories).
absolute() {
	case $1 in
	/* | none) printf '%s' "$1" ;;
	*) printf '%s/%s' "$(pwd -P)" "${1#./}" ;;
	esac
}

NL='
'

# --- arguments ------------------------------------------------------------------------

DRY=0
NO_UPDATE=0
GUEST_DIR=${FLOTILLA_VM_DIR:-}
DISK=""
SWAP=4G
DISK_TYPE=""
DOMAIN=""
COMPONENTS=/var/db/flotilla/components
FILES=/usr/local/share/flotilla/files
PKG_LIST=/usr/local/etc/flotilla/pkg.lst
PKG_LIST_GIVEN=0
HOOKS=/usr/local/etc/flotilla/hooks
HOOKS_GIVEN=0
MNT_BASE=/var/run/flotilla
RESOLV=/etc/resolv.conf

while getopts nUd:z:s:T:D:c:f:p:H:m:r:h opt; do
	case $opt in
	n) DRY=1 ;;
	U) NO_UPDATE=1 ;;
	d) GUEST_DIR=$OPTARG ;;
	z) DISK=$OPTARG ;;
	s) SWAP=$OPTARG ;;
	T) DISK_TYPE=$OPTARG ;;
	D) DOMAIN=${OPTARG#.} ;;
	c) COMPONENTS=$OPTARG ;;
	f) FILES=$OPTARG ;;
	p) PKG_LIST=$OPTARG PKG_LIST_GIVEN=1 ;;
	H) HOOKS=$OPTARG HOOKS_GIVEN=1 ;;
	m) MNT_BASE=$OPTARG ;;
	r) RESOLV=$OPTARG ;;
	*) usage ;;
	esac
done
shift $((OPTIND - 1))
[ $# -eq 1 ] || usage
NAME=$1

# --- validation: nothing has been changed yet -----------------------------------------

case $NAME in *"$NL"*) die "$EX_USAGE" "bad VM name" ;; esac
printf '%s\n' "$NAME" | grep -Eq '^[A-Za-z0-9][.A-Za-z0-9_-]{0,229}[A-Za-z0-9]$' ||
	die "$EX_USAGE" "bad VM name '$NAME' (vm-bhyve refuses it)"
if [ -n "${FLOTILLA_VM:-}" ] && [ "$FLOTILLA_VM" != "$NAME" ]; then
	die "$EX_USAGE" "FLOTILLA_VM is '$FLOTILLA_VM' but NAME is '$NAME'"
fi
case $DOMAIN in *"$NL"*) die "$EX_USAGE" "bad domain" ;; esac
if [ -n "$DOMAIN" ]; then
	printf '%s\n' "$DOMAIN" | grep -Eq '^[A-Za-z0-9]([.A-Za-z0-9-]*[A-Za-z0-9])?$' ||
		die "$EX_USAGE" "bad domain '$DOMAIN'"
	HOSTNAME_FQ=$NAME.$DOMAIN
else
	HOSTNAME_FQ=$NAME
fi
[ -n "$GUEST_DIR" ] || die "$EX_USAGE" "no guest directory: give -d or FLOTILLA_VM_DIR"
GUEST_DIR=$(absolute "$GUEST_DIR")
COMPONENTS=$(absolute "$COMPONENTS")
FILES=$(absolute "$FILES")
PKG_LIST=$(absolute "$PKG_LIST")
HOOKS=$(absolute "$HOOKS")
RESOLV=$(absolute "$RESOLV")
case $MNT_BASE in /*) ;; *) die "$EX_USAGE" "-m must be an absolute path" ;; esac
SWAP_MIB=$(to_mib "$SWAP") || die "$EX_USAGE" "bad swap size '$SWAP' (whole MiB: 512m, 4G, 0)"
if [ -n "$DISK" ]; then
	DISK_MIB=$(to_mib "$DISK") || die "$EX_USAGE" "bad disk size '$DISK' (whole MiB: 30G)"
fi

[ "$DRY" -eq 1 ] || [ "$(uname -s)" = FreeBSD ] ||
	die "$EX_UNAVAILABLE" "builds run on FreeBSD only; use -n to see the steps"
[ "$DRY" -eq 1 ] || [ "$(id -u)" -eq 0 ] || die "$EX_NOPERM" "must run as root"

[ -d "$GUEST_DIR" ] || die "$EX_NOINPUT" "no guest directory $GUEST_DIR (run vm create first)"
CONF=$GUEST_DIR/$NAME.conf
DISK_NAME=disk0.img
if [ -f "$CONF" ]; then
	dev=$(conf_value "$CONF" disk0_dev)
	case $dev in '' | file) ;; *) die "$EX_DATAERR" "disk0_dev=$dev: only file disks are built" ;; esac
	name=$(conf_value "$CONF" disk0_name)
	[ -z "$name" ] || DISK_NAME=$name
	[ -n "$DISK_TYPE" ] || DISK_TYPE=$(conf_value "$CONF" disk0_type)
fi
case $DISK_NAME in */* | .*) die "$EX_DATAERR" "disk0_name=$DISK_NAME is not a file in the guest directory" ;; esac
IMAGE=$GUEST_DIR/$DISK_NAME
[ -f "$IMAGE" ] || die "$EX_NOINPUT" "no disk image $IMAGE"

# The device the guest's kernel gives disk0 (FreeBSD 14 names nvme namespaces nda).
case $DISK_TYPE in
nvme) GUEST_DISK=nda0 ;;
virtio-blk) GUEST_DISK=vtbd0 ;;
ahci-hd) GUEST_DISK=ada0 ;;
'') die "$EX_DATAERR" "no disk0_type in $CONF; give -T nvme|virtio-blk|ahci-hd" ;;
*) die "$EX_DATAERR" "disk0_type=$DISK_TYPE cannot hold a root file system" ;;
esac

IMAGE_BYTES=$(wc -c <"$IMAGE" | tr -d ' ')
case $IMAGE_BYTES in '' | *[!0-9]*) die "$EX_NOINPUT" "cannot read the size of $IMAGE" ;; esac
if [ -z "$DISK" ]; then
	[ $((IMAGE_BYTES % 1048576)) -eq 0 ] || die "$EX_DATAERR" "$IMAGE is not whole MiB; give -z"
	DISK_MIB=$((IMAGE_BYTES / 1048576))
fi
if [ "$IMAGE_BYTES" -gt $(((DISK_MIB + PAD_MIB) * 1048576)) ]; then
	die "$EX_DATAERR" "$IMAGE ($IMAGE_BYTES bytes) is larger than the disk size $DISK_MIB MiB plus $PAD_MIB MiB"
fi
ROOT_MIB=$((DISK_MIB - SWAP_MIB))
[ "$ROOT_MIB" -ge 1024 ] || die "$EX_USAGE" "disk ${DISK_MIB}m minus swap ${SWAP_MIB}m leaves less than 1G for the root"

# Partitions: p1 boot, then p2 swap (when there is swap) and the root.
if [ "$SWAP_MIB" -gt 0 ]; then
	SWAP_PART=2
	ROOT_PART=3
else
	SWAP_PART=""
	ROOT_PART=2
fi

for c in base.txz kernel.txz; do
	[ -f "$COMPONENTS/$c" ] || die "$EX_NOINPUT" "no $COMPONENTS/$c (fetch the release's distribution files)"
done
if [ "$FILES" != none ] && [ ! -d "$FILES" ]; then
	die "$EX_NOINPUT" "no overlay directory $FILES (give -f none to build without one)"
fi
[ -f "$RESOLV" ] || die "$EX_NOINPUT" "no resolver file $RESOLV for the build (give -r)"

PACKAGES=""
if [ "$PKG_LIST" != none ]; then
	if [ -f "$PKG_LIST" ]; then
		PACKAGES=$(awk '{ sub(/#.*/, ""); for (i = 1; i <= NF; i++) printf "%s%s", sep, $i; sep = " " }' "$PKG_LIST") ||
			die "$EX_NOINPUT" "cannot read $PKG_LIST"
		for p in $PACKAGES; do
			case $p in
			-* | *[!A-Za-z0-9._+@/-]*) die "$EX_DATAERR" "$PKG_LIST: bad package name '$p'" ;;
			esac
		done
	elif [ "$PKG_LIST_GIVEN" -eq 1 ]; then
		die "$EX_NOINPUT" "no package list $PKG_LIST"
	fi
fi

PRE_HOOK=""
LOCAL_HOOK=""
POST_HOOK=""
if [ "$HOOKS" != none ]; then
	if [ -d "$HOOKS" ]; then
		for h in pre local post; do
			[ -e "$HOOKS/$h.sh" ] || continue
			if [ ! -f "$HOOKS/$h.sh" ] || [ ! -x "$HOOKS/$h.sh" ]; then
				log "skipping $HOOKS/$h.sh: not an executable file"
				continue
			fi
			case $h in
			pre) PRE_HOOK=$HOOKS/pre.sh ;;
			local) LOCAL_HOOK=$HOOKS/local.sh ;;
			post) POST_HOOK=$HOOKS/post.sh ;;
			esac
		done
	elif [ "$HOOKS_GIVEN" -eq 1 ]; then
		die "$EX_NOINPUT" "no hooks directory $HOOKS"
	fi
fi

# Secrets: paths only. Check each is a readable file; never open it.
for var in $(env | sed -n 's/^\(FLOTILLA_SECRET_[A-Za-z0-9_]*\)=.*/\1/p' | sort -u); do
	eval "path=\${$var-}"
	# shellcheck disable=SC2154 # set by the eval above
	if [ ! -f "$path" ] || [ ! -r "$path" ]; then
		die "$EX_NOINPUT" "$var: no readable secret file $path"
	fi
	[ "$DRY" -eq 0 ] || log "dry run: hooks get $var=$path"
done

ROOT=$MNT_BASE/$NAME
if [ -d "$ROOT" ] && [ -n "$(ls -A "$ROOT" 2>/dev/null)" ]; then
	die "$EX_CANTCREAT" "mount point $ROOT is not empty (another build, or a leftover mount)"
fi

FLOTILLA_VM=$NAME
FLOTILLA_VM_DIR=$GUEST_DIR
FLOTILLA_ROOT=$ROOT
FLOTILLA_HOSTNAME=$HOSTNAME_FQ
FLOTILLA_COMPONENTS=$COMPONENTS
if [ "$NO_UPDATE" -eq 0 ]; then FLOTILLA_FREEBSD_UPDATE=yes; else FLOTILLA_FREEBSD_UPDATE=no; fi
export FLOTILLA_VM FLOTILLA_VM_DIR FLOTILLA_ROOT FLOTILLA_HOSTNAME FLOTILLA_COMPONENTS \
	FLOTILLA_FREEBSD_UPDATE

# The hooks validate their options now, before anything costly (stdout kept for the steps).
for hook in "$PRE_HOOK" "$LOCAL_HOOK" "$POST_HOOK"; do
	[ -n "$hook" ] || continue
	"$hook" check >&2 || {
		check_rc=$?
		die "$check_rc" "$hook check refused the options ($check_rc); nothing was changed"
	}
done

# --- the build ------------------------------------------------------------------------

trap on_exit EXIT
trap on_signal HUP INT QUIT TERM XCPU XFSZ

run truncate -s $(((DISK_MIB + PAD_MIB) * 1048576)) "$IMAGE"
capture "$MD_PLACEHOLDER" mdconfig -a -t vnode -f "$IMAGE"
case $CAPTURED in md[0-9]*) ;; *) die "$EX_DATAERR" "mdconfig printed '$CAPTURED', not an md unit" ;; esac
MD=$CAPTURED

run gpart create -s gpt "$MD"
run gpart add -a 1m -t freebsd-boot -s 512k "$MD"
[ -z "$SWAP_PART" ] || run gpart add -a 1m -t freebsd-swap -s "${SWAP_MIB}m" "$MD"
run gpart add -a 1m -t freebsd-ufs -s "${ROOT_MIB}m" "$MD"
run gpart bootcode -b /boot/pmbr -p /boot/gptboot -i 1 "$MD"
run newfs -U "/dev/${MD}p$ROOT_PART"

run mkdir -p "$ROOT"
MNT_MADE=1
run mount "/dev/${MD}p$ROOT_PART" "$ROOT"
ROOT_MOUNTED=1

run tar -C "$ROOT" -xpf "$COMPONENTS/base.txz"
run tar -C "$ROOT" -xpf "$COMPONENTS/kernel.txz"
run mount -t devfs devfs "$ROOT/dev"
DEVFS_MOUNTED=1

[ "$FILES" = none ] || run cp -R "$FILES/." "$ROOT/"

if [ -n "$SWAP_PART" ]; then
	write_lines "$ROOT/etc/fstab" \
		"# Device Mountpoint FStype Options Dump Pass (flotilla, disk0_type=$DISK_TYPE)" \
		"/dev/${GUEST_DISK}p$ROOT_PART / ufs rw 1 1" \
		"/dev/${GUEST_DISK}p$SWAP_PART none swap sw 0 0"
else
	write_lines "$ROOT/etc/fstab" \
		"# Device Mountpoint FStype Options Dump Pass (flotilla, disk0_type=$DISK_TYPE)" \
		"/dev/${GUEST_DISK}p$ROOT_PART / ufs rw 1 1"
fi

# The guest's own resolv.conf (from the overlay, if any) waits aside while the host's
# resolver serves pkg and the hooks.
# A dry run has no guest root to look in; base.txz ships no resolv.conf, so the overlay
# decides.
if [ "$DRY" -eq 0 ]; then
	resolv_probe=$ROOT/etc/resolv.conf
elif [ "$FILES" != none ]; then
	resolv_probe=$FILES/etc/resolv.conf
else
	resolv_probe=""
fi
HAD_RESOLV=0
if [ -n "$resolv_probe" ] && { [ -e "$resolv_probe" ] || [ -L "$resolv_probe" ]; }; then
	HAD_RESOLV=1
fi
[ "$HAD_RESOLV" -eq 0 ] || run mv -f "$ROOT/etc/resolv.conf" "$ROOT/$RESOLV_SAVED"
run cp "$RESOLV" "$ROOT/etc/resolv.conf"

if [ -n "$PACKAGES" ]; then
	# shellcheck disable=SC2086 # the list splits into package names, checked above
	run pkg -c "$ROOT" install -y -- $PACKAGES
fi

run sysrc -R "$ROOT" "hostname=$HOSTNAME_FQ"

[ -z "$PRE_HOOK" ] || in_root_hook "$PRE_HOOK"

if [ -n "$LOCAL_HOOK" ]; then
	run install -m 0700 "$LOCAL_HOOK" "$ROOT$LOCAL_IN_GUEST"
	run env FLOTILLA_ROOT=/ chroot "$ROOT" "$LOCAL_IN_GUEST" run
	run rm -f "$ROOT$LOCAL_IN_GUEST"
fi

if [ "$NO_UPDATE" -eq 0 ]; then
	capture "$VERSION_PLACEHOLDER" "$ROOT/bin/freebsd-version" -u
	RELEASE=${CAPTURED%%-p[0-9]*}
	run env PAGER=cat freebsd-update --not-running-from-cron -b "$ROOT" \
		-d "$ROOT/var/db/freebsd-update" -f "$ROOT/etc/freebsd-update.conf" \
		--currently-running "$RELEASE" fetch install
fi

[ -z "$POST_HOOK" ] || in_root_hook "$POST_HOOK"

run rm -f "$ROOT/etc/resolv.conf"
[ "$HAD_RESOLV" -eq 0 ] || run mv -f "$ROOT/$RESOLV_SAVED" "$ROOT/etc/resolv.conf"

run umount "$ROOT/dev"
DEVFS_MOUNTED=0
run umount "$ROOT"
ROOT_MOUNTED=0
run rmdir "$ROOT"
MNT_MADE=0
run mdconfig -d -u "$MD"
MD=""

if [ "$DRY" -eq 1 ]; then
	log "dry run: nothing was changed"
else
	log "built $NAME ($HOSTNAME_FQ): ${SWAP_MIB}m swap, ${ROOT_MIB}m root on /dev/${GUEST_DISK}p$ROOT_PART"
fi
exit 0
