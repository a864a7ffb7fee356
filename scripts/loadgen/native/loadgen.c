/*
 * A native load generator for securechat and, with the same rules, an IRC server (ngircd).
 *
 * One thread, one epoll loop, non-blocking sockets and OpenSSL (TLS 1.3, the server verified
 * against our CA and host name). A securechat client logs in for real: hello, the challenge,
 * then auth with an Ed25519 signature over the same length-prefixed transcript that
 * securechat/protocol.py's login_transcript() builds. An IRC client registers with NICK/USER
 * and JOINs the channel.
 *
 * Workloads:
 *   fanout  N members in one room; S senders each keep W messages in flight for D seconds.
 *           A message is back when a fixed other member, its sender's witness, reads it: IRC
 *           does not echo a sender's own message, so both servers get this one rule. Nothing
 *           is batched on purpose: whatever a loop turn queues for one connection leaves in
 *           one TLS write, for either server.
 *           With --rate R it is open loop instead: R messages a second in all, message m (from
 *           0) due at t0 + m/R from sender m mod S, so each sender sends every S/R seconds and
 *           the senders take turns. A message goes when its time comes, whatever is still in
 *           flight; ceil(R x D) are offered. Each carries its due time, not the time it left:
 *           one that waits (our loop was late, or its socket would not take it yet and it
 *           queued) counts that wait in its latency, so queueing is never hidden. Latency is
 *           then timed at the witnesses only, and the members that neither send nor witness
 *           are read in sweeps (every SWEEP_MS, SWEEP_CHUNK a loop turn), as the Python load
 *           generator's probes are: one thread reading all N at once for every message would
 *           put its own queue into the figure. The server writes to every member either way.
 *   hold    N clients logged in (IRC: registered), then held idle for D seconds.
 *
 * With --ciphertext-size L (securechat only) the room is an end-to-end encrypted one: each member
 * joins it (the first join creates it encrypted) and every message is a say_encrypted whose
 * ciphertext is L base64 characters, the length a real Megolm message of --size bytes of text
 * has (scripts/loadgen/native.py computes L with vodozemac). The server relays it as it is; the
 * send time rides at the start of the ciphertext, in base64's alphabet.
 *
 * Prints one JSON line (and, without --json, a short table). Scripts drive it:
 * scripts/loadgen/native.py builds it, starts the servers and sweeps.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <limits.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <arpa/inet.h>
#include <sched.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/timerfd.h>
#include <time.h>
#include <unistd.h>

#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/rand.h>
#include <openssl/ssl.h>
#include <openssl/x509.h>

#define LOGIN_CONTEXT "securechat/login/v1" /* protocol.LOGIN_CONTEXT */
#define PROTOCOL_VERSION 2                  /* protocol.PROTOCOL_VERSION */
#define DEVICE_ID "LOADGENDEVICEAAA"        /* one device per user: a valid id (A-Z2-7) */
#define NONCE_BYTES 32                      /* protocol.NONCE_BYTES */
#define MAX_FRAME (16u << 20)               /* the most a securechat server may announce */
#define READ_CHUNK 65536
#define READS_PER_TURN 32
#define STAMP_LEN 29 /* "~T" + 20-digit send time + "." + 5-digit sender + "~" */
#define CIPHER_MARK "\"ciphertext\":\""
#define CIPHER_STAMP_LEN 27 /* "T" + 20-digit send time + "S" + 5-digit sender: base64 letters */
#define CIPHER_SYNC "SYNCSYNC"
#define SESSION_ID "LoadgenSessionLoadgenSessionLoadgenSession0" /* 43 chars, as vodozemac's */
#define MAX_CIPHERTEXT 4096
#define MAX_SENDERS 99999
#define NS 1000000000ull
#define TIMER_ID UINT32_MAX /* epoll's mark for the schedule's timer */
#define SWEEP_MS 50          /* --rate: the other members are read this often ... */
#define SWEEP_CHUNK 16       /* ... this many a loop turn, so a witness never waits on a whole sweep */

enum proto { SECURECHAT, IRC };
enum workload { FANOUT, HOLD };
enum state { WAITING, CONNECTING, HANDSHAKE, LOGIN, READY, CLOSED }; /* LOGIN: up to the join */
enum phase { OPENING, SYNCING, RUNNING, DRAINING, HOLDING, DONE };

struct buf {
    unsigned char *data;
    size_t off, len, cap; /* live bytes are data[off..len) */
};

struct conn {
    int fd;
    SSL *ssl;
    enum state state;
    uint32_t events; /* what epoll watches for it now */
    int dirty;       /* output queued since the last flush pass */
    int pending;     /* on the pending list: more to read than one turn reads */
    int lazy;        /* --rate: read in sweeps, neither a sender nor a witness */
    uint64_t deadline;
    unsigned char seed[32];
    unsigned char cert_sha256[32];
    EVP_PKEY *key;
    struct buf in, out;
    uint64_t next_id;
    uint64_t received;        /* deliveries from other senders, whole run */
    uint64_t window_received; /* ... that arrived inside the measured window */
    uint64_t acks, refused;
};

struct sender {
    uint64_t sent, back; /* messages sent; messages its witness has read (or refused) */
    uint64_t window_sent;
    int witness;
};

/* Latency histogram in microseconds: 1 us steps below 2 ms, then 10, 100, 1,000 and 10,000 us
 * steps per decade, so every recorded value is within 0.5 % of the truth up to 20 s. */
#define HIST_LEVELS 5
#define HIST_BASE 2000
#define HIST_STEP 1800
struct hist {
    uint64_t bucket[HIST_BASE + HIST_STEP * (HIST_LEVELS - 1) + 1];
    uint64_t count, max_us;
};
static struct hist lat; /* every delivery; at a fixed rate, each message at its witness only */
static struct hist late; /* --rate: how late our loop queued each message, after its due time */

static struct {
    enum proto proto;
    enum workload workload;
    const char *host, *sni, *ca, *room, *label;
    int port, n, senders, window, size, concurrency, cpu, json_only, quickack, ciphertext_size;
    int window_given;
    double duration, grace, login_timeout, rate;
    int server_pid;
    char prefix[16];
} opt = {
    .proto = SECURECHAT, .workload = FANOUT, .host = "127.0.0.1", .sni = "localhost",
    .ca = NULL, .room = "#lobby", .label = NULL, .port = 0, .n = 50, .senders = 10,
    .window = 4, .size = 100, .concurrency = 0, .cpu = -1, .json_only = 0, .quickack = 1, .duration = 5,
    .grace = 5, .login_timeout = 60, .server_pid = 0,
};

static struct {
    int epfd;
    SSL_CTX *ctx;
    struct sockaddr_in addr;
    struct conn *conns;
    struct sender *senders;
    int *dirty, *pending;
    int ndirty, npending;
    enum phase phase;
    uint64_t now;
    int next_to_open, in_flight, ready, failed, dropped, sync_from, sync_seen;
    char fail_reason[160], drop_reason[160];
    uint64_t open_start, last_ready, t0, t_stop, drain_until, hold_until, sync_deadline;
    double lg_cpu_open, lg_cpu_t0, lg_cpu_stop, server_cpu_open;
    double server_cpu_login, lg_cpu_login, server_cpu_t0, server_cpu_stop;
    long rss_before_kib, rss_after_kib;
    uint64_t window_deliveries, delivered_total, refused;
    int measured_alive;
    /* --rate: the schedule */
    int timerfd;
    uint64_t offered, next_due, unsent, window_witnessed, sweep_at;
    int sweep_pos; /* the next member a sweep reads; -1 between sweeps */
} g;

/* -- small helpers ---------------------------------------------------------------------------- */

static void die(const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    fputs("loadgen: ", stderr);
    vfprintf(stderr, fmt, ap);
    fputc('\n', stderr);
    va_end(ap);
    exit(2);
}

static uint64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * NS + (uint64_t)ts.tv_nsec;
}

static double own_cpu_seconds(void) {
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    return ru.ru_utime.tv_sec + ru.ru_stime.tv_sec + (ru.ru_utime.tv_usec + ru.ru_stime.tv_usec) / 1e6;
}

/* User plus system CPU seconds of a whole process (all threads), from /proc/PID/stat. */
static double server_cpu_seconds(void) {
    if (!opt.server_pid)
        return 0;
    char path[64], text[1024];
    snprintf(path, sizeof path, "/proc/%d/stat", opt.server_pid);
    FILE *f = fopen(path, "r");
    if (!f)
        return 0;
    size_t len = fread(text, 1, sizeof text - 1, f);
    fclose(f);
    text[len] = 0;
    char *p = strrchr(text, ')'); /* the command name may hold spaces */
    unsigned long utime = 0, stime = 0;
    if (!p || sscanf(p + 2, "%*c %*d %*d %*d %*d %*d %*u %*u %*u %*u %*u %lu %lu", &utime, &stime) != 2)
        return 0;
    return (double)(utime + stime) / sysconf(_SC_CLK_TCK);
}

/* Resident memory of the server in KiB, from /proc/PID/status. */
static long server_rss_kib(void) {
    if (!opt.server_pid)
        return 0;
    char path[64], line[256];
    snprintf(path, sizeof path, "/proc/%d/status", opt.server_pid);
    FILE *f = fopen(path, "r");
    if (!f)
        return 0;
    long kib = 0;
    while (fgets(line, sizeof line, f))
        if (sscanf(line, "VmRSS: %ld", &kib) == 1)
            break;
    fclose(f);
    return kib;
}

static void buf_reserve(struct buf *b, size_t more) {
    if (b->off && b->len + more > b->cap) { /* reuse the consumed front first */
        memmove(b->data, b->data + b->off, b->len - b->off);
        b->len -= b->off;
        b->off = 0;
    }
    if (b->len + more <= b->cap)
        return;
    size_t cap = b->cap ? b->cap : 512;
    while (cap < b->len + more)
        cap *= 2;
    b->data = realloc(b->data, cap);
    if (!b->data)
        die("out of memory");
    b->cap = cap;
}

static void buf_put(struct buf *b, const void *data, size_t len) {
    buf_reserve(b, len);
    memcpy(b->data + b->len, data, len);
    b->len += len;
}

static void buf_free(struct buf *b) {
    free(b->data);
    memset(b, 0, sizeof *b);
}

static void hist_add(struct hist *h, uint64_t ns) {
    uint64_t us = ns / 1000, i;
    if (us < HIST_BASE) {
        i = us;
    } else {
        uint64_t lo = HIST_BASE, step = 10;
        i = HIST_BASE;
        for (int level = 1; level < HIST_LEVELS; level++, lo *= 10, step *= 10, i += HIST_STEP)
            if (us < lo * 10)
                break;
        i = i >= HIST_BASE + HIST_STEP * (HIST_LEVELS - 1) ? HIST_BASE + HIST_STEP * (HIST_LEVELS - 1)
                                                          : i + (us - lo) / step;
    }
    h->bucket[i]++;
    h->count++;
    if (us > h->max_us)
        h->max_us = us;
}

/* The lower edge of bucket i, in microseconds. */
static double hist_value(uint64_t i) {
    if (i < HIST_BASE)
        return (double)i;
    uint64_t lo = HIST_BASE, step = 10;
    i -= HIST_BASE;
    while (i >= HIST_STEP) {
        i -= HIST_STEP;
        lo *= 10;
        step *= 10;
    }
    return (double)(lo + i * step);
}

static double hist_percentile_ms(const struct hist *h, double q) {
    if (!h->count)
        return -1;
    uint64_t rank = (uint64_t)(q * h->count), seen = 0;
    if (rank >= h->count)
        rank = h->count - 1;
    for (uint64_t i = 0; i < sizeof h->bucket / sizeof h->bucket[0]; i++) {
        seen += h->bucket[i];
        if (seen > rank)
            return hist_value(i) / 1000.0;
    }
    return h->max_us / 1000.0;
}

/* -- connections ------------------------------------------------------------------------------ */

static void watch(struct conn *c, uint32_t events) {
    if (c->events == events)
        return;
    struct epoll_event ev = {.events = events, .data.u32 = (uint32_t)(c - g.conns)};
    if (epoll_ctl(g.epfd, c->events ? EPOLL_CTL_MOD : EPOLL_CTL_ADD, c->fd, &ev) < 0)
        die("epoll_ctl: %s", strerror(errno));
    c->events = events;
}

/* What to read on: a lazy member only its close (a sweep reads its data). */
static uint32_t reading(const struct conn *c) {
    return c->lazy ? EPOLLRDHUP : EPOLLIN;
}

static void release(struct conn *c) {
    if (c->ssl)
        SSL_free(c->ssl);
    if (c->fd >= 0)
        close(c->fd); /* also takes it out of epoll */
    if (c->key)
        EVP_PKEY_free(c->key);
    c->ssl = NULL;
    c->key = NULL;
    c->fd = -1;
    c->events = 0;
    buf_free(&c->in);
    buf_free(&c->out);
    c->state = CLOSED;
}

static void open_more(void);

static void note_reason(char *into, const char *why) {
    if (!into[0])
        snprintf(into, 160, "%s", why);
}

/* A client that never got in: counted as a failed login, with the first reason kept. */
static void login_failed(struct conn *c, const char *why) {
    release(c);
    g.failed++;
    g.in_flight--;
    note_reason(g.fail_reason, why);
    open_more();
}

/* A client lost after it was in (the server dropped it, or TLS failed). */
static void lost(struct conn *c, const char *why) {
    if (c->state != READY) {
        login_failed(c, why);
        return;
    }
    release(c);
    g.ready--;
    g.dropped++;
    note_reason(g.drop_reason, why);
}

static void tls_reason(char *out, size_t size, const char *what) {
    unsigned long e = ERR_get_error();
    if (e)
        snprintf(out, size, "%s: %s", what, ERR_reason_error_string(e) ? ERR_reason_error_string(e) : "tls error");
    else
        snprintf(out, size, "%s: %s", what, errno ? strerror(errno) : "connection closed");
    ERR_clear_error();
}

static void queue(struct conn *c, const void *data, size_t len) {
    buf_put(&c->out, data, len);
    if (!c->dirty) {
        c->dirty = 1;
        g.dirty[g.ndirty++] = (int)(c - g.conns);
    }
}

/* Write what is queued; whatever the socket does not take waits for EPOLLOUT. */
static void flush(struct conn *c) {
    c->dirty = 0;
    if (c->state != READY && c->state != LOGIN)
        return;
    while (c->out.len > c->out.off) {
        size_t left = c->out.len - c->out.off;
        int r = SSL_write(c->ssl, c->out.data + c->out.off, left > INT_MAX ? INT_MAX : (int)left);
        if (r > 0) {
            c->out.off += (size_t)r;
            continue;
        }
        int e = SSL_get_error(c->ssl, r);
        if (e == SSL_ERROR_WANT_WRITE) {
            watch(c, reading(c) | EPOLLOUT);
            return;
        }
        if (e == SSL_ERROR_WANT_READ)
            return; /* TLS must read first; EPOLLIN is watched (a lazy member's next sweep) */
        char why[160];
        tls_reason(why, sizeof why, "write");
        lost(c, why);
        return;
    }
    c->out.off = c->out.len = 0;
    watch(c, reading(c));
}

static void flush_dirty(void) {
    for (int i = 0; i < g.ndirty; i++) {
        struct conn *c = &g.conns[g.dirty[i]];
        if (c->dirty)
            flush(c);
    }
    g.ndirty = 0;
}

static void name_of(int i, char *out, size_t size) {
    snprintf(out, size, "%s%d", opt.prefix, i);
}

/* -- what goes on the wire -------------------------------------------------------------------- */

static void queue_frame(struct conn *c, const char *json, size_t len) {
    unsigned char head[4] = {(unsigned char)(len >> 24), (unsigned char)(len >> 16),
                             (unsigned char)(len >> 8), (unsigned char)len};
    queue(c, head, 4);
    queue(c, json, len);
}

static void queue_say(struct conn *c, const char *text) {
    char line[MAX_CIPHERTEXT + 256];
    int len;
    if (opt.proto == SECURECHAT && opt.ciphertext_size)
        len = snprintf(line, sizeof line,
                       "{\"type\":\"say_encrypted\",\"id\":%llu,\"room\":\"%s\",\"session_id\":\"%s\","
                       "\"ciphertext\":\"%s\"}",
                       (unsigned long long)++c->next_id, opt.room, SESSION_ID, text);
    else if (opt.proto == SECURECHAT)
        len = snprintf(line, sizeof line, "{\"type\":\"say\",\"id\":%llu,\"room\":\"%s\",\"text\":\"%s\"}",
                       (unsigned long long)++c->next_id, opt.room, text);
    else
        len = snprintf(line, sizeof line, "PRIVMSG %s :%s\r\n", opt.room, text);
    if (opt.proto == SECURECHAT)
        queue_frame(c, line, (size_t)len);
    else
        queue(c, line, (size_t)len);
}

/* The payload of a message, padded to its size: x after the text, A after a ciphertext. */
static void padded(char *text, int len) {
    int size = opt.ciphertext_size ? opt.ciphertext_size : opt.size;
    while (len < size)
        text[len++] = opt.ciphertext_size ? 'A' : 'x';
    text[len] = 0;
}

/* A timed message: "~T<send time ns>.<sender>~" (a ciphertext: "T<send time ns>S<sender>").
 * The send time is `stamp`: now in window mode, the due time at a fixed rate. */
static void send_message(int s, uint64_t stamp) {
    char text[MAX_CIPHERTEXT + 1];
    const char *form = opt.ciphertext_size ? "T%020lluS%05d" : "~T%020llu.%05d~";
    padded(text, snprintf(text, sizeof text, form, (unsigned long long)stamp, s));
    queue_say(&g.conns[s], text);
    g.senders[s].sent++;
    if (g.phase == RUNNING)
        g.senders[s].window_sent++;
}

/* The window rule, the same for both servers: W messages in flight per sender, a new one as
 * soon as one is back, and only while the measured window is open. */
static void fill_window(int s) {
    struct sender *sd = &g.senders[s];
    if (opt.rate > 0 || g.phase != RUNNING || g.conns[s].state != READY)
        return;
    while (sd->sent - sd->back < (uint64_t)opt.window)
        send_message(s, now_ns());
}

/* --rate: how many messages the window offers, ceil(R x D): the m with m/R < D. The tolerance
 * keeps a product that floating point puts a hair above a whole number (0.1 x 30) at it. */
static uint64_t offered_count(void) {
    double x = opt.rate * opt.duration - 1e-9;
    uint64_t m = (uint64_t)x;
    return (double)m < x ? m + 1 : m;
}

/* --rate: when message m is due. */
static uint64_t due_time(uint64_t m) {
    return g.t0 + (uint64_t)((double)m * 1e9 / opt.rate);
}

static void arm_timer(uint64_t at_ns) {
    struct itimerspec when = {.it_value = {.tv_sec = (time_t)(at_ns / NS), .tv_nsec = (long)(at_ns % NS)}};
    if (timerfd_settime(g.timerfd, TFD_TIMER_ABSTIME, &when, NULL) < 0)
        die("timerfd_settime: %s", strerror(errno));
}

/* --rate: queue every message whose time has come, then set the timer for the next one. At most
 * g.offered messages in all; a sender that is gone has its turns counted as unsent. */
static void send_due(void) {
    if (opt.rate <= 0 || g.phase != RUNNING)
        return;
    uint64_t now = now_ns();
    while (g.next_due < g.offered && due_time(g.next_due) <= now) {
        uint64_t due = due_time(g.next_due);
        int s = (int)(g.next_due % (uint64_t)opt.senders);
        g.next_due++;
        if (g.conns[s].state != READY) {
            g.unsent++;
            continue;
        }
        hist_add(&late, now - due);
        send_message(s, due);
    }
    if (g.next_due < g.offered)
        arm_timer(due_time(g.next_due));
}

static void message_back(int s) {
    if (g.senders[s].back >= g.senders[s].sent)
        return; /* nothing of its own in flight */
    g.senders[s].back++;
    fill_window(s);
}

static void start_login(struct conn *c) {
    char name[40];
    name_of((int)(c - g.conns), name, sizeof name);
    if (opt.proto == IRC) {
        char line[128];
        int len = snprintf(line, sizeof line, "NICK %s\r\nUSER %s 0 * :bench\r\n", name, name);
        queue(c, line, (size_t)len);
        return;
    }
    unsigned char pub[32];
    size_t publen = sizeof pub;
    c->key = EVP_PKEY_new_raw_private_key(EVP_PKEY_ED25519, NULL, c->seed, sizeof c->seed);
    if (!c->key || !EVP_PKEY_get_raw_public_key(c->key, pub, &publen))
        die("cannot make an Ed25519 key");
    char pub64[64], json[256];
    EVP_EncodeBlock((unsigned char *)pub64, pub, (int)publen);
    int len = snprintf(json, sizeof json,
                       "{\"type\":\"hello\",\"user\":\"%s\",\"key\":\"%s\",\"version\":%d,"
                       "\"device\":\"%s\"}",
                       name, pub64, PROTOCOL_VERSION, DEVICE_ID);
    queue_frame(c, json, (size_t)len);
}

static unsigned char *put_part(unsigned char *p, const void *data, size_t len) {
    p[0] = (unsigned char)(len >> 24);
    p[1] = (unsigned char)(len >> 16);
    p[2] = (unsigned char)(len >> 8);
    p[3] = (unsigned char)len;
    memcpy(p + 4, data, len);
    return p + 4 + len;
}

/* The value of "field":"..." in a JSON frame of ours (no escapes occur in the fields read). */
static int json_string(const unsigned char *p, size_t len, const char *field, char *out, size_t size) {
    char key[40];
    int klen = snprintf(key, sizeof key, "\"%s\":\"", field);
    const unsigned char *at = memmem(p, len, key, (size_t)klen);
    if (!at)
        return -1;
    at += klen;
    const unsigned char *end = memchr(at, '"', len - (size_t)(at - p));
    if (!end || (size_t)(end - at) >= size)
        return -1;
    memcpy(out, at, (size_t)(end - at));
    out[end - at] = 0;
    return (int)(end - at);
}

/* Answer the challenge: sign securechat's login transcript, as protocol.login_transcript builds
 * it (each part a 4-byte big-endian length, then the bytes: context, nonce, user, key, the
 * SHA-256 of the server certificate's DER). */
static int answer_challenge(struct conn *c, const unsigned char *p, size_t len) {
    char nonce64[128], name[40];
    unsigned char nonce[96], pub[32], sig[64], transcript[512];
    int n64 = json_string(p, len, "nonce", nonce64, sizeof nonce64);
    if (n64 <= 0)
        return -1;
    int nlen = EVP_DecodeBlock(nonce, (unsigned char *)nonce64, n64);
    for (int i = n64 - 1; i >= 0 && nonce64[i] == '='; i--)
        nlen--; /* EVP_DecodeBlock counts the padding as zero bytes */
    if (nlen != NONCE_BYTES)
        return -1;
    size_t publen = sizeof pub, siglen = sizeof sig;
    EVP_PKEY_get_raw_public_key(c->key, pub, &publen);
    name_of((int)(c - g.conns), name, sizeof name);
    unsigned char *t = transcript;
    t = put_part(t, LOGIN_CONTEXT, strlen(LOGIN_CONTEXT));
    t = put_part(t, nonce, NONCE_BYTES);
    t = put_part(t, name, strlen(name));
    t = put_part(t, pub, publen);
    t = put_part(t, c->cert_sha256, sizeof c->cert_sha256);
    EVP_MD_CTX *md = EVP_MD_CTX_new();
    int ok = md && EVP_DigestSignInit(md, NULL, NULL, NULL, c->key) == 1 &&
             EVP_DigestSign(md, sig, &siglen, transcript, (size_t)(t - transcript)) == 1;
    EVP_MD_CTX_free(md);
    if (!ok)
        return -1;
    EVP_PKEY_free(c->key); /* the key signs one login and is not needed after it */
    c->key = NULL;
    char sig64[100], json[200];
    EVP_EncodeBlock((unsigned char *)sig64, sig, (int)siglen);
    int jlen = snprintf(json, sizeof json, "{\"type\":\"auth\",\"signature\":\"%s\"}", sig64);
    queue_frame(c, json, (size_t)jlen);
    return 0;
}

static void became_ready(struct conn *c) {
    c->state = READY;
    g.ready++;
    g.in_flight--;
    g.last_ready = g.now;
    open_more();
}

/* -- what comes back -------------------------------------------------------------------------- */

/* A room message read by member c. The text carries its send time and sender. */
static void delivery(struct conn *c, const unsigned char *p, size_t len) {
    const unsigned char *m;
    if (opt.ciphertext_size) {
        m = memmem(p, len, CIPHER_MARK, strlen(CIPHER_MARK));
        if (m)
            m += strlen(CIPHER_MARK) - 1; /* now m[1] is the stamp's T, as with "~T" */
    } else {
        m = memmem(p, len, "~T", 2);
    }
    const char *sync = opt.ciphertext_size ? CIPHER_SYNC : "~Ssync~";
    if (!m || m[1] != 'T') {
        if (memmem(p, len, sync, strlen(sync)) && g.phase == SYNCING && (int)(c - g.conns) != g.sync_from)
            g.sync_seen++;
        return;
    }
    if (opt.ciphertext_size ? (size_t)(m - p) + 1 + CIPHER_STAMP_LEN > len || m[22] != 'S'
                            : (size_t)(m - p) + STAMP_LEN > len || m[22] != '.' || m[28] != '~')
        return;
    uint64_t sent = 0;
    int s = 0;
    for (int i = 2; i < 22; i++)
        sent = sent * 10 + (uint64_t)(m[i] - '0');
    for (int i = 23; i < 28; i++)
        s = s * 10 + (m[i] - '0');
    int me = (int)(c - g.conns);
    /* securechat echoes a sender's own message: not a delivery. A message sent before this run
     * (room history on a reused server, say) is none of ours. */
    if (s == me || s >= opt.senders || sent < g.t0 || g.t0 == 0)
        return;
    c->received++;
    g.delivered_total++;
    if (g.phase == RUNNING) {
        c->window_received++;
        g.window_deliveries++;
    }
    uint64_t latency = g.now > sent ? g.now - sent : 0; /* all messages are sent in the window */
    int witness = g.senders[s].witness == me;
    if (witness || opt.rate <= 0)
        hist_add(&lat, latency);
    if (witness) {
        if (g.phase == RUNNING)
            g.window_witnessed++;
        message_back(s);
    }
}

static void refusal(struct conn *c) {
    c->refused++;
    g.refused++;
    int me = (int)(c - g.conns);
    if (me < opt.senders)
        message_back(me); /* a refused message never comes back: its slot is free again */
}

static int frame_is(const unsigned char *p, size_t len, const char *type) {
    char head[40];
    int hlen = snprintf(head, sizeof head, "{\"type\":\"%s\"", type);
    return len >= (size_t)hlen && memcmp(p, head, (size_t)hlen) == 0;
}

static void securechat_frame(struct conn *c, const unsigned char *p, size_t len) {
    if (c->state == READY) {
        if (frame_is(p, len, "message") || frame_is(p, len, "message_encrypted"))
            delivery(c, p, len);
        else if (frame_is(p, len, "ok"))
            c->acks++;
        else if (frame_is(p, len, "error"))
            refusal(c);
        else if (frame_is(p, len, "ping"))
            queue_frame(c, "{\"type\":\"pong\"}", 15);
        else if (frame_is(p, len, "bye")) {
            char reason[100] = "bye";
            json_string(p, len, "reason", reason, sizeof reason);
            lost(c, reason);
        }
        return;
    }
    if (frame_is(p, len, "challenge")) {
        if (answer_challenge(c, p, len) < 0)
            login_failed(c, "bad challenge");
    } else if (frame_is(p, len, "welcome")) {
        if (opt.ciphertext_size && opt.workload == FANOUT) {
            char line[200]; /* an encrypted room is not joined at login, as #lobby is */
            int l = snprintf(line, sizeof line, "{\"type\":\"join\",\"id\":%llu,\"room\":\"%s\"}",
                             (unsigned long long)++c->next_id, opt.room);
            queue_frame(c, line, (size_t)l);
        } else {
            became_ready(c);
        }
    } else if (frame_is(p, len, "ok")) {
        became_ready(c); /* the join */
    } else if (frame_is(p, len, "error") || frame_is(p, len, "bye")) {
        char why[120] = "refused";
        if (json_string(p, len, "code", why, sizeof why) < 0)
            json_string(p, len, "reason", why, sizeof why);
        login_failed(c, why);
    }
}

static int irc_code(const unsigned char *p, size_t len, const char *code) {
    size_t clen = strlen(code);
    const unsigned char *sp = memchr(p, ' ', len);
    return sp && (size_t)(sp + 1 - p) + clen < len && memcmp(sp + 1, code, clen) == 0 && sp[1 + clen] == ' ';
}

static void irc_line(struct conn *c, const unsigned char *p, size_t len) {
    if (len >= 5 && memcmp(p, "PING ", 5) == 0) {
        queue(c, "PONG ", 5);
        queue(c, p + 5, len - 5);
        queue(c, "\r\n", 2);
        return;
    }
    if (c->state == READY) {
        if (irc_code(p, len, "PRIVMSG"))
            delivery(c, p, len);
        else if (irc_code(p, len, "404"))
            refusal(c);
        else if (len >= 5 && memcmp(p, "ERROR", 5) == 0)
            lost(c, "ERROR from the server");
        return;
    }
    if (irc_code(p, len, "001")) {
        if (opt.workload == HOLD) {
            became_ready(c); /* held clients stay out of channels, as in the Python generator */
        } else {
            char line[80];
            int l = snprintf(line, sizeof line, "JOIN %s\r\n", opt.room);
            queue(c, line, (size_t)l);
        }
    } else if (irc_code(p, len, "366")) {
        became_ready(c);
    } else if (irc_code(p, len, "433") || irc_code(p, len, "432") || irc_code(p, len, "465") ||
               irc_code(p, len, "471") || irc_code(p, len, "473") || irc_code(p, len, "474") ||
               (len >= 5 && memcmp(p, "ERROR", 5) == 0)) {
        char why[120];
        snprintf(why, sizeof why, "%.*s", (int)(len < 100 ? len : 100), p);
        login_failed(c, why);
    }
}

/* Split what was read into frames (securechat) or lines (IRC) and handle each. */
static void consume(struct conn *c) {
    struct buf *b = &c->in;
    while (c->state == READY || c->state == LOGIN) {
        unsigned char *p = b->data + b->off;
        size_t have = b->len - b->off;
        if (opt.proto == SECURECHAT) {
            if (have < 4)
                break;
            uint32_t flen = ((uint32_t)p[0] << 24) | ((uint32_t)p[1] << 16) | ((uint32_t)p[2] << 8) | p[3];
            if (flen == 0 || flen > MAX_FRAME) {
                lost(c, "bad frame length from the server");
                return;
            }
            if (have < 4 + (size_t)flen)
                break;
            b->off += 4 + flen;
            securechat_frame(c, p + 4, flen);
        } else {
            unsigned char *nl = memchr(p, '\n', have);
            if (!nl)
                break;
            size_t len = (size_t)(nl - p);
            b->off += len + 1;
            irc_line(c, p, len && p[len - 1] == '\r' ? len - 1 : len);
        }
    }
    if (c->state == READY || c->state == LOGIN) {
        if (b->off == b->len)
            b->off = b->len = 0;
    }
}

/* Read until the socket is empty, or READS_PER_TURN records: then the connection waits on the
 * pending list for the next turn, since with read-ahead what OpenSSL already holds is invisible
 * to epoll, and one busy member must not starve the others. */
static void read_all(struct conn *c) {
    unsigned char chunk[READ_CHUNK];
    int got = 0;
    for (int k = 0; c->state == READY || c->state == LOGIN; k++) {
        if (k == READS_PER_TURN) {
            if (!c->pending) {
                c->pending = 1;
                g.pending[g.npending++] = (int)(c - g.conns);
            }
            break;
        }
        int r = SSL_read(c->ssl, chunk, sizeof chunk);
        if (r > 0) {
            got = 1;
            g.now = now_ns();
            buf_put(&c->in, chunk, (size_t)r);
            consume(c);
            continue;
        }
        int e = SSL_get_error(c->ssl, r);
        if (e == SSL_ERROR_WANT_READ)
            break;
        if (e == SSL_ERROR_WANT_WRITE) {
            watch(c, reading(c) | EPOLLOUT);
            break;
        }
        char why[160];
        if (e == SSL_ERROR_ZERO_RETURN)
            snprintf(why, sizeof why, "server closed the connection");
        else
            tls_reason(why, sizeof why, "read");
        lost(c, why);
        return;
    }
    if (got && opt.quickack && c->fd >= 0) {
        /* Linux delays an ACK up to 40 ms and falls back to that after a quick one; a server
         * that leaves Nagle on (ngircd does) would then wait on that timer between writes. */
        int one = 1;
        setsockopt(c->fd, IPPROTO_TCP, TCP_QUICKACK, &one, sizeof one);
    }
}

static void read_pending(void) {
    int n = g.npending;
    g.npending = 0;
    for (int i = 0; i < n; i++) {
        struct conn *c = &g.conns[g.pending[i]];
        c->pending = 0;
        if (c->state == READY || c->state == LOGIN)
            read_all(c);
    }
}

/* -- opening connections ---------------------------------------------------------------------- */

static void start_connect(struct conn *c) {
    c->fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (c->fd < 0) {
        char why[100];
        snprintf(why, sizeof why, "socket: %s", strerror(errno));
        c->state = CONNECTING;
        login_failed(c, why);
        return;
    }
    int one = 1;
    setsockopt(c->fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    c->state = CONNECTING;
    c->deadline = g.now + (uint64_t)(opt.login_timeout * NS);
    if (connect(c->fd, (struct sockaddr *)&g.addr, sizeof g.addr) < 0 && errno != EINPROGRESS) {
        char why[100];
        snprintf(why, sizeof why, "connect: %s", strerror(errno));
        login_failed(c, why);
        return;
    }
    watch(c, EPOLLOUT);
}

static void open_more(void) {
    while (g.phase == OPENING && g.next_to_open < opt.n && g.in_flight < opt.concurrency) {
        struct conn *c = &g.conns[g.next_to_open++];
        g.in_flight++;
        start_connect(c);
    }
}

static void handshake(struct conn *c) {
    int r = SSL_connect(c->ssl);
    if (r == 1) {
#if OPENSSL_VERSION_NUMBER >= 0x30000000L
        X509 *cert = SSL_get1_peer_certificate(c->ssl);
#else
        X509 *cert = SSL_get_peer_certificate(c->ssl);
#endif
        unsigned int dlen = 0;
        int ok = cert && X509_digest(cert, EVP_sha256(), c->cert_sha256, &dlen) && dlen == 32;
        X509_free(cert);
        if (!ok) {
            login_failed(c, "no server certificate");
            return;
        }
        c->state = LOGIN;
        start_login(c);
        flush(c);
        if (c->state == LOGIN)
            read_all(c);
        return;
    }
    int e = SSL_get_error(c->ssl, r);
    if (e == SSL_ERROR_WANT_READ)
        watch(c, EPOLLIN);
    else if (e == SSL_ERROR_WANT_WRITE)
        watch(c, EPOLLOUT);
    else {
        char why[160];
        long verify = SSL_get_verify_result(c->ssl);
        if (verify != X509_V_OK) {
            snprintf(why, sizeof why, "tls: certificate verify failed: %s", X509_verify_cert_error_string(verify));
            ERR_clear_error();
        } else {
            tls_reason(why, sizeof why, "tls");
        }
        login_failed(c, why);
    }
}

static void on_event(struct conn *c, uint32_t events) {
    if (c->state == CONNECTING) {
        int err = 0;
        socklen_t len = sizeof err;
        getsockopt(c->fd, SOL_SOCKET, SO_ERROR, &err, &len);
        if (err) {
            char why[100];
            snprintf(why, sizeof why, "connect: %s", strerror(err));
            login_failed(c, why);
            return;
        }
        c->ssl = SSL_new(g.ctx);
        if (!c->ssl || !SSL_set_fd(c->ssl, c->fd) || !SSL_set_tlsext_host_name(c->ssl, opt.sni) ||
            !SSL_set1_host(c->ssl, opt.sni))
            die("cannot set up a TLS connection");
        c->state = HANDSHAKE;
    }
    if (c->state == HANDSHAKE) {
        handshake(c);
        return;
    }
    if (events & EPOLLOUT)
        flush(c);
    if (events & (EPOLLIN | EPOLLRDHUP | EPOLLHUP | EPOLLERR))
        read_all(c);
}

static void check_login_deadlines(void) {
    static const char *stage[] = {"", "timed out connecting", "timed out in the TLS handshake", "timed out logging in"};
    for (int i = 0; i < g.next_to_open; i++) {
        struct conn *c = &g.conns[i];
        if (c->state >= CONNECTING && c->state <= LOGIN && g.now > c->deadline)
            login_failed(c, stage[c->state]);
    }
}

/* -- phases ----------------------------------------------------------------------------------- */

static int first_ready(void) {
    for (int i = 0; i < opt.n; i++)
        if (g.conns[i].state == READY)
            return i;
    return -1;
}

/* Every member has read everything sent before the sync message (the join notices, say) once it
 * has read that message: each connection's stream is in order. */
static void start_sync(void) {
    g.phase = SYNCING;
    g.sync_seen = 0;
    g.sync_from = first_ready();
    g.sync_deadline = g.now + (uint64_t)(opt.login_timeout * NS);
    char sync[MAX_CIPHERTEXT + 1];
    if (opt.ciphertext_size)
        padded(sync, snprintf(sync, sizeof sync, "%s", CIPHER_SYNC));
    queue_say(&g.conns[g.sync_from], opt.ciphertext_size ? sync : "~Ssync~");
}

static void start_run(void) {
    g.phase = RUNNING;
    g.t0 = now_ns();
    g.now = g.t0;
    g.t_stop = g.t0 + (uint64_t)(opt.duration * NS);
    g.server_cpu_t0 = server_cpu_seconds();
    g.lg_cpu_t0 = own_cpu_seconds();
    if (opt.rate > 0) {
        for (int i = opt.senders; i < opt.n; i++) {
            struct conn *c = &g.conns[i];
            c->lazy = 1;
            for (int s = 0; s < opt.senders; s++)
                c->lazy &= g.senders[s].witness != i;
            if (c->state == READY)
                watch(c, reading(c));
        }
        g.sweep_pos = -1;
        g.sweep_at = g.t0 + SWEEP_MS * 1000000ull;
        g.offered = offered_count();
        send_due();
    }
    for (int s = 0; s < opt.senders; s++)
        fill_window(s);
}

static void stop_run(void) {
    g.t_stop = now_ns(); /* the window as it really closed */
    g.server_cpu_stop = server_cpu_seconds();
    g.lg_cpu_stop = own_cpu_seconds();
    g.rss_after_kib = server_rss_kib();
    g.measured_alive = g.ready;
    g.phase = DRAINING;
    g.drain_until = g.t_stop + (uint64_t)(opt.grace * NS);
}

/* Every member still here has read every message that the others sent. */
static int drained(void) {
    uint64_t total = 0;
    for (int s = 0; s < opt.senders; s++)
        total += g.senders[s].sent;
    for (int i = 0; i < opt.n; i++) {
        struct conn *c = &g.conns[i];
        uint64_t own = i < opt.senders ? g.senders[i].sent : 0;
        if (c->state == READY && c->received < total - own)
            return 0;
    }
    return 1;
}

static void after_logins(void) {
    g.server_cpu_login = server_cpu_seconds() - g.server_cpu_open;
    g.lg_cpu_login = own_cpu_seconds() - g.lg_cpu_open;
    if (g.ready == 0) {
        g.phase = DONE;
        return;
    }
    if (opt.workload == HOLD) {
        g.phase = HOLDING;
        g.hold_until = g.now + (uint64_t)(opt.duration * NS);
    } else {
        start_sync();
    }
}

static void tick(void) {
    switch (g.phase) {
    case OPENING:
        if (g.next_to_open == opt.n && g.in_flight == 0)
            after_logins();
        break;
    case SYNCING:
        if (g.sync_seen >= g.ready - 1)
            start_run();
        else if (g.now > g.sync_deadline)
            die("the room did not settle: %d of %d members read the sync message", g.sync_seen, g.ready - 1);
        break;
    case RUNNING: /* at a fixed rate, not before the last offered message went (it is due by now) */
        if (g.now >= g.t_stop && (opt.rate <= 0 || g.next_due == g.offered))
            stop_run();
        break;
    case DRAINING:
        if (g.now >= g.drain_until || drained())
            g.phase = DONE;
        break;
    case HOLDING:
        if (g.now >= g.hold_until) {
            g.rss_after_kib = server_rss_kib();
            g.phase = DONE;
        }
        break;
    case DONE:
        break;
    }
}

/* --rate: read the lazy members, SWEEP_CHUNK a call, a sweep every SWEEP_MS while the run and
 * its drain last. */
static void sweep_step(void) {
    if (opt.rate <= 0 || (g.phase != RUNNING && g.phase != DRAINING))
        return;
    if (g.sweep_pos < 0) {
        if (g.now < g.sweep_at)
            return;
        g.sweep_pos = 0;
        g.sweep_at = g.now + SWEEP_MS * 1000000ull;
    }
    for (int k = 0; k < SWEEP_CHUNK && g.sweep_pos < opt.n; g.sweep_pos++) {
        struct conn *c = &g.conns[g.sweep_pos];
        if (c->lazy && c->state == READY) {
            read_all(c);
            k++;
        }
    }
    if (g.sweep_pos == opt.n)
        g.sweep_pos = -1;
}

static void on_timer(void) {
    uint64_t fired;
    if (read(g.timerfd, &fired, sizeof fired) < 0 && errno != EAGAIN)
        die("timerfd read: %s", strerror(errno));
}

static int loop_timeout_ms(void) {
    if (opt.rate > 0 && g.sweep_pos >= 0 && (g.phase == RUNNING || g.phase == DRAINING))
        return 0; /* a sweep under way goes on at once, after what epoll has */
    return g.phase == OPENING || g.phase == HOLDING ? 100 : 5;
}

static void run(void) {
    struct epoll_event events[512];
    uint64_t last_check = now_ns();
    g.phase = OPENING;
    g.now = now_ns();
    g.open_start = g.now;
    g.rss_before_kib = server_rss_kib();
    g.server_cpu_open = server_cpu_seconds();
    g.lg_cpu_open = own_cpu_seconds();
    open_more();
    while (g.phase != DONE) {
        int k = epoll_wait(g.epfd, events, 512, g.npending ? 0 : loop_timeout_ms());
        if (k < 0 && errno != EINTR)
            die("epoll_wait: %s", strerror(errno));
        g.now = now_ns();
        for (int i = 0; i < k; i++) {
            if (events[i].data.u32 == TIMER_ID) {
                on_timer();
                continue;
            }
            struct conn *c = &g.conns[events[i].data.u32];
            if (c->state != CLOSED && c->state != WAITING)
                on_event(c, events[i].events);
        }
        read_pending();
        sweep_step();
        send_due();
        flush_dirty();
        g.now = now_ns();
        if (g.phase == OPENING && g.now - last_check > NS) {
            last_check = g.now;
            check_login_deadlines();
        }
        send_due(); /* all that fell due before the window closes goes out before tick closes it */
        tick();
        flush_dirty();
    }
}

/* -- the report ------------------------------------------------------------------------------- */

static void json_str(const char *key, const char *value) {
    printf("\"%s\":\"", key);
    for (const char *p = value; *p; p++)
        if (*p == '"' || *p == '\\')
            printf("\\%c", *p);
        else if ((unsigned char)*p < 0x20)
            putchar(' ');
        else
            putchar(*p);
    printf("\"");
}

static void report(void) {
    double login_s = g.last_ready > g.open_start ? (g.last_ready - g.open_start) / 1e9 : 0;
    printf("{\"target\":\"%s\",\"workload\":\"%s\",\"n\":%d,", opt.label, opt.workload == HOLD ? "hold" : "fanout", opt.n);
    printf("\"logged_in\":%d,\"login_failures\":%d,", g.ready + g.dropped, g.failed);
    json_str("login_failure", g.fail_reason);
    printf(",\"login_seconds\":%.3f,\"logins_per_s\":%.1f,", login_s, login_s > 0 ? (g.ready + g.dropped) / login_s : 0);
    if (opt.server_pid && login_s > 0)
        printf("\"login_server_cpu_pct\":%.1f,", 100 * g.server_cpu_login / login_s);
    printf("\"login_loadgen_cpu_pct\":%.1f,", login_s > 0 ? 100 * g.lg_cpu_login / login_s : 0);
    if (opt.workload == FANOUT && g.t_stop > g.t0) {
        double secs = (g.t_stop - g.t0) / 1e9;
        uint64_t sent = 0, window_sent = 0, expected = 0, received = 0, lo = UINT64_MAX, hi = 0;
        for (int s = 0; s < opt.senders; s++) {
            sent += g.senders[s].sent;
            window_sent += g.senders[s].window_sent;
        }
        for (int i = 0; i < opt.n; i++) {
            struct conn *c = &g.conns[i];
            if (c->state != READY)
                continue;
            expected += sent - (i < opt.senders ? g.senders[i].sent : 0);
            received += c->received;
            if (c->window_received < lo)
                lo = c->window_received;
            if (c->window_received > hi)
                hi = c->window_received;
        }
        printf("\"senders\":%d,\"window\":%d,\"size\":%d,\"duration\":%.3f,", opt.senders,
               opt.rate > 0 ? 0 : opt.window, opt.size, secs);
        if (opt.rate > 0) {
            printf("\"rate\":%g,\"offered\":%llu,\"unsent\":%llu,\"offered_per_s\":%.1f,", opt.rate,
                   (unsigned long long)g.offered, (unsigned long long)g.unsent, g.offered / secs);
            printf("\"achieved_per_s\":%.1f,\"send_late_p99_ms\":%.3f,\"send_late_max_ms\":%.3f,",
                   g.window_witnessed / secs, hist_percentile_ms(&late, 0.99), late.max_us / 1000.0);
        }
        if (opt.ciphertext_size)
            printf("\"encrypted\":true,\"ciphertext_size\":%d,", opt.ciphertext_size);
        printf("\"sent\":%llu,\"sent_total\":%llu,", (unsigned long long)window_sent, (unsigned long long)sent);
        printf("\"deliveries\":%llu,\"deliveries_per_s\":%.1f,", (unsigned long long)g.window_deliveries, g.window_deliveries / secs);
        printf("\"member_min_per_s\":%.1f,\"member_max_per_s\":%.1f,", lo == UINT64_MAX ? 0 : lo / secs, hi / secs);
        printf("\"delivered_total\":%llu,\"expected_total\":%llu,\"missing\":%llu,",
               (unsigned long long)received, (unsigned long long)expected,
               (unsigned long long)(expected > received ? expected - received : 0));
        printf("\"refused\":%llu,\"latency_samples\":%llu,", (unsigned long long)g.refused, (unsigned long long)lat.count);
        printf("\"p50_ms\":%.3f,\"p99_ms\":%.3f,\"max_ms\":%.3f,", hist_percentile_ms(&lat, 0.50),
               hist_percentile_ms(&lat, 0.99), lat.max_us / 1000.0);
        printf("\"loadgen_cpu_pct\":%.1f,", 100 * (g.lg_cpu_stop - g.lg_cpu_t0) / secs);
        if (opt.server_pid)
            printf("\"server_cpu_pct\":%.1f,", 100 * (g.server_cpu_stop - g.server_cpu_t0) / secs);
    }
    if (opt.workload == HOLD)
        printf("\"duration\":%.3f,\"held\":%d,", opt.duration, g.ready);
    if (opt.server_pid) {
        int in = g.ready + g.dropped;
        printf("\"server_rss_mib\":%.1f,\"rss_per_conn_kib\":%.2f,", g.rss_after_kib / 1024.0,
               in ? (double)(g.rss_after_kib - g.rss_before_kib) / in : 0);
    }
    printf("\"still_connected\":%d,\"dropped\":%d,\"quickack\":%s,", g.ready, g.dropped, opt.quickack ? "true" : "false");
    json_str("drop_reason", g.drop_reason);
    printf("}\n");
    if (!opt.json_only && opt.workload == FANOUT && g.t_stop > g.t0) {
        double secs = (g.t_stop - g.t0) / 1e9;
        printf("%-12s %7s %14s %9s %9s %9s %12s %12s", "server", "N", "deliveries/s", "p50 ms", "p99 ms", "max ms",
               "server CPU%", "loadgen CPU%");
        if (opt.rate > 0)
            printf(" %10s %11s", "offered/s", "achieved/s");
        printf("\n%-12s %7d %14.0f %9.2f %9.2f %9.2f %12.0f %12.0f", opt.label, opt.n, g.window_deliveries / secs,
               hist_percentile_ms(&lat, 0.5), hist_percentile_ms(&lat, 0.99), lat.max_us / 1000.0,
               100 * (g.server_cpu_stop - g.server_cpu_t0) / secs, 100 * (g.lg_cpu_stop - g.lg_cpu_t0) / secs);
        if (opt.rate > 0)
            printf(" %10.1f %11.1f", g.offered / secs, g.window_witnessed / secs);
        putchar('\n');
    } else if (!opt.json_only) {
        printf("%-12s %7s %10s %7s %14s\n", "server", "N", "logins/s", "held", "RSS/conn KiB");
        printf("%-12s %7d %10.0f %7d %14.2f\n", opt.label, opt.n, login_s > 0 ? (g.ready + g.dropped) / login_s : 0,
               g.ready, g.ready ? (double)(g.rss_after_kib - g.rss_before_kib) / g.ready : 0);
    }
    fflush(stdout);
}

/* -- set-up ----------------------------------------------------------------------------------- */

static void usage(void) {
    fputs("usage: loadgen --port PORT --ca CA.pem [options]\n"
          "  --proto securechat|irc     the server's protocol (default securechat)\n"
          "  --workload fanout|hold     (default fanout)\n"
          "  --host ADDR --sni NAME     IPv4 address to connect to (127.0.0.1), TLS host name (localhost)\n"
          "  -n N                       room members or held clients (50)\n"
          "  --senders S --window W     fanout: senders, messages in flight a sender (10, 4)\n"
          "  --rate R                   fanout, open loop instead of a window: R messages a second\n"
          "                             in all, due evenly spaced, the senders taking turns; each\n"
          "                             goes when due, whatever is in flight; ceil(R x D) offered.\n"
          "                             Latency counts from the due time: a message our loop or its\n"
          "                             socket held back still counts its wait (queueing not hidden);\n"
          "                             timed at each sender's witness, other members read in sweeps\n"
          "  --size P                   fanout: message text, bytes (100; 32 to 400)\n"
          "  --duration D               seconds measured (fanout) or held (hold) (5)\n"
          "  --grace G                  fanout: seconds to wait for messages in flight (5)\n"
          "  --concurrency C            logins in flight (securechat 256, irc 40)\n"
          "  --login-timeout T          seconds a login may take (60)\n"
          "  --server-pid PID           read the server's CPU and RSS from /proc/PID\n"
          "  --cpu K                    pin the load generator to CPU K\n"
          "  --room ROOM --label NAME   room to use (#lobby); name in the report\n"
          "  --ciphertext-size L        securechat: an encrypted room (give --room), each message a\n"
          "                             say_encrypted of L base64 characters (64 to 4096)\n"
          "  --delayed-ack              leave the kernel's delayed ACKs on (default: ACK each read at once)\n"
          "  --json                     the JSON line only\n",
          stderr);
    exit(2);
}

static double number(const char *name, const char *value, double lo, double hi) {
    char *end;
    double v = strtod(value, &end);
    if (*end || v < lo || v > hi)
        die("%s must be a number from %g to %g, not %s", name, lo, hi, value);
    return v;
}

static void parse(int argc, char **argv) {
    static struct option longs[] = {
        {"proto", 1, 0, 'P'},       {"workload", 1, 0, 'w'}, {"host", 1, 0, 'H'},    {"port", 1, 0, 'p'},
        {"sni", 1, 0, 's'},         {"ca", 1, 0, 'c'},       {"senders", 1, 0, 'S'}, {"window", 1, 0, 'W'},
        {"size", 1, 0, 'z'},        {"duration", 1, 0, 'd'}, {"grace", 1, 0, 'g'},   {"concurrency", 1, 0, 'C'},
        {"login-timeout", 1, 0, 't'}, {"server-pid", 1, 0, 'i'}, {"cpu", 1, 0, 'k'}, {"room", 1, 0, 'r'},
        {"label", 1, 0, 'l'},       {"json", 0, 0, 'j'},     {"help", 0, 0, 'h'},    {"delayed-ack", 0, 0, 'a'},
        {"ciphertext-size", 1, 0, 'e'}, {"rate", 1, 0, 'R'}, {0, 0, 0, 0},
    };
    int ch;
    while ((ch = getopt_long(argc, argv, "n:h", longs, NULL)) != -1) {
        switch (ch) {
        case 'P':
            if (strcmp(optarg, "securechat") == 0)
                opt.proto = SECURECHAT;
            else if (strcmp(optarg, "irc") == 0)
                opt.proto = IRC;
            else
                die("--proto must be securechat or irc, not %s", optarg);
            break;
        case 'w':
            if (strcmp(optarg, "fanout") == 0)
                opt.workload = FANOUT;
            else if (strcmp(optarg, "hold") == 0)
                opt.workload = HOLD;
            else
                die("--workload must be fanout or hold, not %s", optarg);
            break;
        case 'H': opt.host = optarg; break;
        case 'p': opt.port = (int)number("--port", optarg, 1, 65535); break;
        case 's': opt.sni = optarg; break;
        case 'c': opt.ca = optarg; break;
        case 'n': opt.n = (int)number("-n", optarg, 1, 1000000); break;
        case 'S': opt.senders = (int)number("--senders", optarg, 1, MAX_SENDERS); break;
        case 'W':
            opt.window = (int)number("--window", optarg, 1, 100000);
            opt.window_given = 1;
            break;
        case 'R': opt.rate = number("--rate", optarg, 0.01, 10000000); break;
        case 'z': opt.size = (int)number("--size", optarg, 32, 400); break;
        case 'd': opt.duration = number("--duration", optarg, 0.01, 3600); break;
        case 'g': opt.grace = number("--grace", optarg, 0, 600); break;
        case 'C': opt.concurrency = (int)number("--concurrency", optarg, 1, 100000); break;
        case 't': opt.login_timeout = number("--login-timeout", optarg, 1, 3600); break;
        case 'i': opt.server_pid = (int)number("--server-pid", optarg, 1, INT_MAX); break;
        case 'k': opt.cpu = (int)number("--cpu", optarg, 0, CPU_SETSIZE - 1); break;
        case 'r': opt.room = optarg; break;
        case 'l': opt.label = optarg; break;
        case 'j': opt.json_only = 1; break;
        case 'a': opt.quickack = 0; break;
        case 'e': opt.ciphertext_size = (int)number("--ciphertext-size", optarg, 64, MAX_CIPHERTEXT); break;
        default: usage();
        }
    }
    if (optind != argc || !opt.port || !opt.ca)
        usage();
    if (opt.workload == FANOUT && opt.n < 2)
        die("fanout needs at least 2 members");
    if (opt.workload == FANOUT && opt.senders > opt.n)
        die("--senders (%d) cannot exceed -n (%d)", opt.senders, opt.n);
    if (opt.rate > 0 && (opt.workload != FANOUT || opt.window_given))
        die("--rate is fanout's, instead of --window: give one of them");
    if (strlen(opt.room) > 60 || strpbrk(opt.room, "\"\\ \r\n"))
        die("--room must be a plain room name");
    if (opt.ciphertext_size && (opt.proto != SECURECHAT || strcmp(opt.room, "#lobby") == 0))
        die("--ciphertext-size is for a securechat room of its own: #lobby is never encrypted");
    if (opt.ciphertext_size % 4)
        die("--ciphertext-size must be a multiple of 4 (padded base64), not %d", opt.ciphertext_size);
    if (!opt.concurrency)
        opt.concurrency = opt.proto == IRC ? 40 : 256;
    if (!opt.label)
        opt.label = opt.proto == IRC ? "irc" : "securechat";
    if (inet_pton(AF_INET, opt.host, &g.addr.sin_addr) != 1)
        die("--host must be an IPv4 address, not %s", opt.host);
    g.addr.sin_family = AF_INET;
    g.addr.sin_port = htons((uint16_t)opt.port);
}

int main(int argc, char **argv) {
    parse(argc, argv);
    signal(SIGPIPE, SIG_IGN);
    if (opt.cpu >= 0) {
        cpu_set_t set;
        CPU_ZERO(&set);
        CPU_SET(opt.cpu, &set);
        if (sched_setaffinity(0, sizeof set, &set) < 0)
            die("cannot pin to CPU %d: %s", opt.cpu, strerror(errno));
    }
    struct rlimit rl;
    if (getrlimit(RLIMIT_NOFILE, &rl) == 0) {
        rl.rlim_cur = rl.rlim_max;
        setrlimit(RLIMIT_NOFILE, &rl);
    }
    g.ctx = SSL_CTX_new(TLS_client_method());
    if (!g.ctx || !SSL_CTX_set_min_proto_version(g.ctx, TLS1_3_VERSION))
        die("cannot make a TLS 1.3 context");
    if (SSL_CTX_load_verify_locations(g.ctx, opt.ca, NULL) != 1)
        die("cannot read the CA certificate %s", opt.ca);
    SSL_CTX_set_verify(g.ctx, SSL_VERIFY_PEER, NULL);
    SSL_CTX_set_session_cache_mode(g.ctx, SSL_SESS_CACHE_OFF); /* every login a full handshake */
    long mode = SSL_MODE_ENABLE_PARTIAL_WRITE | SSL_MODE_ACCEPT_MOVING_WRITE_BUFFER;
    if (opt.workload == HOLD) {
        mode |= SSL_MODE_RELEASE_BUFFERS; /* idle clients: keep the generator small */
    } else {
        /* Take all the socket holds in one recv, not a record header and a body at a time. */
        SSL_CTX_set_read_ahead(g.ctx, 1);
        SSL_CTX_set_default_read_buffer_len(g.ctx, READ_CHUNK);
    }
    SSL_CTX_set_mode(g.ctx, mode);

    unsigned char tag[2];
    RAND_bytes(tag, sizeof tag);
    snprintf(opt.prefix, sizeof opt.prefix, "n%02x%02x", tag[0], tag[1]);
    g.conns = calloc((size_t)opt.n, sizeof *g.conns);
    g.dirty = calloc((size_t)opt.n, sizeof *g.dirty);
    g.pending = calloc((size_t)opt.n, sizeof *g.pending);
    g.senders = calloc((size_t)opt.senders, sizeof *g.senders);
    if (!g.conns || !g.dirty || !g.pending || !g.senders)
        die("out of memory");
    for (int i = 0; i < opt.n; i++) {
        g.conns[i].fd = -1;
        if (opt.proto == SECURECHAT && RAND_bytes(g.conns[i].seed, sizeof g.conns[i].seed) != 1)
            die("no randomness for the identity keys");
    }
    /* Each sender's witness: a fixed other member, a non-sender while there are enough. */
    for (int s = 0; s < opt.senders; s++) {
        int w = (s + opt.senders) % opt.n;
        g.senders[s].witness = w == s ? (s + 1) % opt.n : w;
    }
    g.epfd = epoll_create1(EPOLL_CLOEXEC);
    if (g.epfd < 0)
        die("epoll_create1: %s", strerror(errno));
    if (opt.rate > 0) { /* the schedule's clock: wakes the loop at each due time, to the µs */
        g.timerfd = timerfd_create(CLOCK_MONOTONIC, TFD_NONBLOCK | TFD_CLOEXEC);
        struct epoll_event ev = {.events = EPOLLIN, .data.u32 = TIMER_ID};
        if (g.timerfd < 0 || epoll_ctl(g.epfd, EPOLL_CTL_ADD, g.timerfd, &ev) < 0)
            die("timerfd: %s", strerror(errno));
    }
    run();
    report();
    return g.ready + g.dropped > 0 ? 0 : 1;
}
