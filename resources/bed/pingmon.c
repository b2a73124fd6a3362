/*
 * pingmon — ping one IPv4 address every few milliseconds while a log file asks for it, and
 * time-stamp every line of that log on the same clock. Runs on L0, inside the network
 * namespace of the nested bed (resources/bed/run-l1.sh --igb, its L1_NETNS_CMD hook), and
 * follows L1's console log as L0's QEMU writes it: L1 switches the pings on and off and
 * prints its events there, so pings, replies and L1's events share one clock.
 * resources/bench/failover.sh builds it (gcc on L0, not part of any image).
 *
 *   pingmon -l LOG -d ADDR -o OUT [-i INTERVAL_MS] [-t MAX_S] [-p PORT]
 *
 * With -p, a slow TCP stream rides along with the pings: at each "PINGMON on" pingmon
 * connects to ADDR:PORT and writes CHUNK (512) bytes with every ping while the socket takes
 * them; at "PINGMON off" it closes its side and waits (20 s at most) for the peer to close
 * too. A stream that survives a failover ends with err=0 and the peer counting every byte.
 *
 * LOG lines that steer it (anywhere in the line; \r is stripped):
 *   PINGMON on         send ICMP echo requests to ADDR every INTERVAL_MS (default 10) from now
 *   PINGMON off        stop sending (replies to requests in flight are still recorded)
 *   L1-SCENARIO-EXIT   L1's scenario is over: stop 0.5 s later
 * It also stops after MAX_S seconds (default 3600) and on SIGTERM/SIGINT (run-l1.sh sends
 * SIGTERM when L1's QEMU has exited), writing out what it has in every case.
 *
 * OUT, one record a line, times in ms (3 decimals) on CLOCK_MONOTONIC since pingmon started:
 *   S <seq> <t> [err=<errno>]   echo request <seq> (0, 1, ...) sent at t (err: sendto failed)
 *   R <seq> <t>                 its first reply received at t (duplicates only counted)
 *   L <t> <line>                a line of LOG, stamped when pingmon read it (LOG is read
 *                               every <= 2 ms, so a line is stamped within ~2 ms of QEMU
 *                               writing it)
 *   T connect <t> | T closed <t> | T err=<errno> <t>   the TCP stream's events (-p)
 *   TCP sent=<bytes> err=<first errno, 0: none> closed=<1: the peer closed cleanly>
 *                              one stream's outcome, when it has ended (or at the END)
 *   END sent=<n> received=<n> dups=<n> duration_ms=<ms>
 * The request's payload holds the 32-bit sequence number and a magic word; the ICMP id is
 * the low 16 bits of pingmon's pid: replies to anyone else's pings are ignored. A schedule
 * that fell more than 5 intervals behind (the host stalled) restarts from now instead of
 * sending a burst. Needs root (a raw socket). Exit status 0; 1 on bad usage or when the
 * socket or OUT cannot be opened.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/ip.h>
#include <netinet/ip_icmp.h>
#include <poll.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define MAGIC 0x504d4f4eu /* "PMON" */
#define PAYLOAD 56        /* like ping(8): 64-byte ICMP messages */
#define CHUNK 512         /* TCP bytes per ping: ~50 KB/s at 10 ms, little next to the pings */

static volatile sig_atomic_t stop_signal;
static double t_start;
static FILE *out;

static double mono_ms(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return ts.tv_sec * 1e3 + ts.tv_nsec / 1e6;
}
static double now(void) { return mono_ms() - t_start; }

static void on_signal(int sig) { stop_signal = sig; }

static uint16_t checksum(const void *data, size_t len) {
  const uint8_t *p = data;
  uint32_t sum = 0;
  for (; len > 1; p += 2, len -= 2) sum += (uint32_t)p[0] << 8 | p[1];
  if (len) sum += (uint32_t)p[0] << 8;
  while (sum >> 16) sum = (sum & 0xffff) + (sum >> 16);
  return htons((uint16_t)~sum);
}

/* ---- following LOG ---- */
static int log_fd = -1;
static const char *log_path;
static char line[1 << 16];
static size_t line_len;
static int pinging, scenario_over;
static double over_at;

static void log_line(void) {
  line[line_len] = 0;
  while (line_len && (line[line_len - 1] == '\r' || line[line_len - 1] == '\n')) line[--line_len] = 0;
  double t = now();
  fprintf(out, "L %.3f %s\n", t, line);
  if (strstr(line, "PINGMON on")) pinging = 1;
  if (strstr(line, "PINGMON off")) pinging = 0;
  if (strstr(line, "L1-SCENARIO-EXIT") && !scenario_over) {
    scenario_over = 1;
    over_at = t + 500;
  }
  line_len = 0;
}

static void follow_log(void) {
  if (log_fd < 0) {
    log_fd = open(log_path, O_RDONLY | O_CLOEXEC);
    if (log_fd < 0) return; /* QEMU has not created it yet */
  }
  char buf[8192];
  ssize_t n;
  while ((n = read(log_fd, buf, sizeof buf)) > 0) {
    for (ssize_t i = 0; i < n; i++) {
      if (buf[i] == '\n') log_line();
      else if (line_len < sizeof line - 1) line[line_len++] = buf[i];
      else log_line(); /* an overlong line is cut in pieces */
    }
  }
}

/* ---- pings ---- */
static int sock;
static struct sockaddr_in dst;
static uint16_t ident;
static uint32_t seq;
static uint8_t *replied; /* per seq: 0 none, 1 replied (dups counted apart) */
static size_t replied_cap;
static unsigned long received, dups;

static void send_one(void) {
  uint8_t pkt[8 + PAYLOAD] = {0};
  struct icmphdr *icmp = (struct icmphdr *)pkt;
  icmp->type = ICMP_ECHO;
  icmp->un.echo.id = htons(ident);
  icmp->un.echo.sequence = htons((uint16_t)seq);
  uint32_t s = htonl(seq), m = htonl(MAGIC);
  memcpy(pkt + 8, &s, 4);
  memcpy(pkt + 12, &m, 4);
  icmp->checksum = checksum(pkt, sizeof pkt);
  double t = now();
  if (sendto(sock, pkt, sizeof pkt, 0, (struct sockaddr *)&dst, sizeof dst) < 0)
    fprintf(out, "S %u %.3f err=%d\n", seq, t, errno);
  else
    fprintf(out, "S %u %.3f\n", seq, t);
  seq++;
}

static void take_replies(void) {
  uint8_t buf[2048];
  struct sockaddr_in from;
  socklen_t fl;
  ssize_t n;
  for (;;) {
    fl = sizeof from;
    n = recvfrom(sock, buf, sizeof buf, MSG_DONTWAIT, (struct sockaddr *)&from, &fl);
    if (n < 0) return;
    double t = now();
    if ((size_t)n < sizeof(struct iphdr)) continue;
    struct iphdr *ip = (struct iphdr *)buf;
    size_t hl = ip->ihl * 4u;
    if ((size_t)n < hl + 8 + 8 || from.sin_addr.s_addr != dst.sin_addr.s_addr) continue;
    struct icmphdr *icmp = (struct icmphdr *)(buf + hl);
    if (icmp->type != ICMP_ECHOREPLY || ntohs(icmp->un.echo.id) != ident) continue;
    uint32_t s, m;
    memcpy(&s, buf + hl + 8, 4);
    memcpy(&m, buf + hl + 12, 4);
    s = ntohl(s);
    if (ntohl(m) != MAGIC || s >= seq) continue;
    if (s >= replied_cap) {
      size_t cap = replied_cap ? replied_cap : 65536;
      while (cap <= s) cap *= 2;
      uint8_t *r = realloc(replied, cap);
      if (!r) continue;
      memset(r + replied_cap, 0, cap - replied_cap);
      replied = r;
      replied_cap = cap;
    }
    if (replied[s]) {
      dups++;
      continue;
    }
    replied[s] = 1;
    received++;
    fprintf(out, "R %u %.3f\n", s, t);
  }
}

/* ---- the TCP stream (-p) ---- */
static int tcp_port, tcp = -1, tcp_err, tcp_closed;
static enum { TCP_IDLE, TCP_STREAMING, TCP_DRAINING } tcp_state;
static double tcp_shut_at;
static unsigned long long tcp_sent;

static void tcp_fail(int err) {
  if (!tcp_err) tcp_err = err;
  fprintf(out, "T err=%d %.3f\n", err, now());
  if (tcp >= 0) close(tcp);
  tcp = -1;
}

static void tcp_report(void) {
  if (tcp_state == TCP_IDLE) return;
  if (tcp >= 0) close(tcp);
  tcp = -1;
  fprintf(out, "TCP sent=%llu err=%d closed=%d\n", tcp_sent, tcp_err, tcp_closed);
  tcp_state = TCP_IDLE;
}

static void tcp_open(void) {
  struct sockaddr_in a = dst;
  a.sin_port = htons((uint16_t)tcp_port);
  tcp_sent = 0, tcp_err = 0, tcp_closed = 0;
  tcp_state = TCP_STREAMING;
  tcp = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
  if (tcp < 0) tcp_fail(errno);
  else if (connect(tcp, (struct sockaddr *)&a, sizeof a) < 0 && errno != EINPROGRESS) tcp_fail(errno);
  else fprintf(out, "T connect %.3f\n", now());
}

/* One chunk, if the socket takes it now (a stream held up by the failover just waits). */
static void tcp_send(void) {
  static char chunk[CHUNK];
  if (tcp < 0 || tcp_state != TCP_STREAMING) return;
  ssize_t n = send(tcp, chunk, sizeof chunk, MSG_DONTWAIT | MSG_NOSIGNAL);
  if (n > 0) tcp_sent += (unsigned long long)n;
  else if (n < 0 && errno != EAGAIN && errno != EWOULDBLOCK && errno != ENOTCONN) tcp_fail(errno);
}

static void tcp_shut(double t) {
  if (tcp_state != TCP_STREAMING) return;
  if (tcp >= 0) shutdown(tcp, SHUT_WR);
  tcp_state = TCP_DRAINING;
  tcp_shut_at = t;
}

/* Our side closed: read until the peer closes (0) or resets the stream, 20 s at most. */
static void tcp_drain(double t) {
  char buf[256];
  if (tcp_state != TCP_DRAINING) return;
  if (tcp >= 0) {
    ssize_t n = recv(tcp, buf, sizeof buf, MSG_DONTWAIT);
    if (n == 0) {
      tcp_closed = 1;
      fprintf(out, "T closed %.3f\n", now());
    } else if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
      if (t - tcp_shut_at <= 20000) return;
      tcp_fail(ETIMEDOUT);
    } else if (n < 0) {
      tcp_fail(errno);
    } else {
      return; /* the peer said something: keep reading */
    }
  }
  tcp_report();
}

static void usage(void) {
  fprintf(stderr, "usage: pingmon -l LOG -d ADDR -o OUT [-i INTERVAL_MS] [-t MAX_S] [-p PORT]\n");
  exit(1);
}

int main(int argc, char **argv) {
  const char *addr = NULL, *out_path = NULL;
  double interval = 10, max_s = 3600;
  int c;
  while ((c = getopt(argc, argv, "l:d:o:i:t:p:")) != -1) {
    switch (c) {
      case 'l': log_path = optarg; break;
      case 'd': addr = optarg; break;
      case 'o': out_path = optarg; break;
      case 'i': interval = atof(optarg); break;
      case 't': max_s = atof(optarg); break;
      case 'p': tcp_port = atoi(optarg); break;
      default: usage();
    }
  }
  if (!log_path || !addr || !out_path || optind != argc || interval < 1 || max_s <= 0 || tcp_port < 0 ||
      tcp_port > 65535)
    usage();
  dst.sin_family = AF_INET;
  if (inet_pton(AF_INET, addr, &dst.sin_addr) != 1) {
    fprintf(stderr, "pingmon: %s is not an IPv4 address\n", addr);
    return 1;
  }
  t_start = mono_ms();
  sock = socket(AF_INET, SOCK_RAW | SOCK_CLOEXEC, IPPROTO_ICMP);
  if (sock < 0) {
    perror("pingmon: raw ICMP socket (root needed)");
    return 1;
  }
  out = fopen(out_path, "w");
  if (!out) {
    perror(out_path);
    return 1;
  }
  ident = (uint16_t)getpid();
  struct sigaction sa = {0};
  sa.sa_handler = on_signal;
  sigaction(SIGTERM, &sa, NULL);
  sigaction(SIGINT, &sa, NULL);

  double next = 0, flushed = 0;
  while (!stop_signal) {
    double t = now();
    if (t > max_s * 1000) break;
    if (scenario_over && t >= over_at) break;
    if (pinging) {
      if (tcp_port && tcp_state == TCP_IDLE) tcp_open();
      if (next == 0 || next < t - 5 * interval) next = t;
      if (t >= next) {
        send_one();
        tcp_send();
        next += interval;
      }
    } else {
      next = 0;
      tcp_shut(t);
      tcp_drain(t);
    }
    double wait = pinging ? next - now() : 2;
    if (wait > 2) wait = 2;
    if (wait < 0) wait = 0;
    struct pollfd pfd = {.fd = sock, .events = POLLIN};
    poll(&pfd, 1, (int)(wait + 0.999));
    take_replies();
    follow_log();
    if (t - flushed > 1000) {
      fflush(out);
      flushed = t;
    }
  }
  take_replies();
  follow_log();
  if (line_len) log_line();
  tcp_report();
  fprintf(out, "END sent=%u received=%lu dups=%lu duration_ms=%.0f\n", seq, received, dups, now());
  fclose(out);
  return 0;
}
