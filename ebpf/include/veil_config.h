/* SPDX-License-Identifier: Apache-2.0 */
/*
 * Build options. Every value comes from a -D flag that agent/bpf/programs.py
 * builds from controller/api/dataplane.py, so ports and marks exist in one
 * place. There are deliberately no defaults: a missing flag is a build error,
 * not a silently different data path.
 *
 * Optional switches:
 *   VEIL_DROP_UDP  drop non-DNS UDP from enrolled pods (and to them, except
 *                  DNS replies); without it UDP passes untouched.
 *   VEIL_ALLOW_ICMP_ECHO  let ICMP/ICMPv6 echo request and reply through to
 *                  and from enrolled pods; without it echo is dropped
 *                  (VEIL_DROP_ICMP), because an echo payload is a data
 *                  channel no policy sees. ICMP errors and neighbour
 *                  discovery pass either way.
 *   VEIL_PROBE_SOURCE6  the node's IPv6 kubelet probe source, given as four
 *                  host-order words VEIL_PROBE_SOURCE6_W0..W3 (most
 *                  significant first); TCP from it passes the egress guard.
 */
#ifndef VEIL_CONFIG_H
#define VEIL_CONFIG_H

#if !defined(VEIL_OUTBOUND_PORT) || !defined(VEIL_INBOUND_PLAINTEXT_PORT) || !defined(VEIL_HBONE_PORT)
#error "ztunnel ports must be passed as -D flags (agent/bpf/programs.py builds them)"
#endif
#if !defined(VEIL_DNS_PORT)
#error "VEIL_DNS_PORT must be passed as a -D flag"
#endif
#if !defined(VEIL_MARK_MASK) || !defined(VEIL_MARK_REDIRECT) || !defined(VEIL_MARK_ZTUNNEL)
#error "packet marks must be passed as -D flags (agent/bpf/programs.py builds them)"
#endif
#if !defined(VEIL_PIN_DIR)
#error "VEIL_PIN_DIR (a string literal) must be passed as a -D flag"
#endif
#if !defined(VEIL_MAX_PODS) || !defined(VEIL_MAX_POD_ADDRS)
#error "VEIL_MAX_PODS and VEIL_MAX_POD_ADDRS must be passed as -D flags"
#endif

#ifdef VEIL_PROBE_SOURCE6
#if !(defined(VEIL_PROBE_SOURCE6_W0) && defined(VEIL_PROBE_SOURCE6_W1) && \
      defined(VEIL_PROBE_SOURCE6_W2) && defined(VEIL_PROBE_SOURCE6_W3))
#error "VEIL_PROBE_SOURCE6 needs VEIL_PROBE_SOURCE6_W0..W3 (agent/bpf/programs.py builds them)"
#endif
#endif

#endif /* VEIL_CONFIG_H */
