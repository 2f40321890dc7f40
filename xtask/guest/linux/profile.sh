# shellcheck shell=sh # /etc/profile of vial's test guest, read by busybox sh -l
export PATH=/sbin:/usr/sbin:/bin:/usr/bin HOME=/root
PS1='vial-guest:\w# '
