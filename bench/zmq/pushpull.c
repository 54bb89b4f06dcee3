/*
 * The libzmq figures beside aemp-bench's e2e ones (issue 18): small messages one way
 * from a PUSH socket to a PULL socket, and a REQ/REP round trip, over loopback TCP.
 *
 * One process, two threads, each end in a context of its own (one I/O thread each, the
 * default), as aemp-bench's e2e group has its two nodes in one process. The payload is
 * the engine's small message, ["port","ping",123] in CBOR (13 bytes).
 *
 *   pushpull [pushpull|reqrep] [-n COUNT]
 *
 * prints, in aemp-bench's table format (name, value, meaning):
 *   pushpull: zmq_pushpull_msgs_per_s   (COUNT messages, default 3,000,000)
 *   reqrep:   zmq_reqrep_rtt_p50_us, zmq_reqrep_rtt_p99_us  (COUNT round trips, 5,000)
 *
 * Built and run by bench/zmq/run (cc -O2 ... -lzmq); not part of the cargo build.
 */
#include <errno.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <zmq.h>

static const unsigned char PAYLOAD[] = {
    0x83,                               /* array of 3 */
    0x64, 'p', 'o', 'r', 't',           /* "port" */
    0x64, 'p', 'i', 'n', 'g',           /* "ping" */
    0x18, 0x7b,                         /* 123 */
};

static char endpoint[64];
static long count;
static pthread_barrier_t go;

static void die(const char *what) {
    fprintf(stderr, "pushpull: %s: %s\n", what, zmq_strerror(zmq_errno()));
    exit(1);
}

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec / 1e9;
}

static void send_payload(void *sock) {
    if (zmq_send(sock, PAYLOAD, sizeof PAYLOAD, 0) != (int)sizeof PAYLOAD) die("send");
}

static void recv_payload(void *sock) {
    unsigned char buf[64];
    int n = zmq_recv(sock, buf, sizeof buf, 0);
    if (n != (int)sizeof PAYLOAD) die("recv");
}

/* Binds a socket of `type` in `ctx` to a free loopback port; fills `endpoint`. */
static void *bound(void *ctx, int type) {
    void *s = zmq_socket(ctx, type);
    if (!s) die("socket");
    if (zmq_bind(s, "tcp://127.0.0.1:*") != 0) die("bind");
    size_t len = sizeof endpoint;
    if (zmq_getsockopt(s, ZMQ_LAST_ENDPOINT, endpoint, &len) != 0) die("endpoint");
    return s;
}

static void *connected(void *ctx, int type) {
    void *s = zmq_socket(ctx, type);
    if (!s) die("socket");
    if (zmq_connect(s, endpoint) != 0) die("connect");
    return s;
}

/* The PUSH side: one message to see the connection up, then `count` after the barrier. */
static void *pusher(void *arg) {
    (void)arg;
    void *ctx = zmq_ctx_new();
    void *push = connected(ctx, ZMQ_PUSH);
    send_payload(push);
    pthread_barrier_wait(&go);
    for (long i = 0; i < count; i++) send_payload(push);
    zmq_close(push); /* the default linger sends what is queued before the context ends */
    zmq_ctx_term(ctx);
    return NULL;
}

static void pushpull(void) {
    void *ctx = zmq_ctx_new();
    void *pull = bound(ctx, ZMQ_PULL);
    pthread_t t;
    pthread_barrier_init(&go, NULL, 2);
    if (pthread_create(&t, NULL, pusher, NULL) != 0) exit(1);
    recv_payload(pull);
    pthread_barrier_wait(&go);
    double start = now();
    for (long i = 0; i < count; i++) recv_payload(pull);
    double rate = count / (now() - start);
    pthread_join(t, NULL);
    zmq_close(pull);
    zmq_ctx_term(ctx);
    printf("%-36s %14.2f  %s\n", "zmq_pushpull_msgs_per_s", rate,
           "13-byte messages/s one way, libzmq PUSH to PULL, loopback TCP");
}

/* The REP side: echoes every request until the REQ side closes the context. */
static void *echoer(void *arg) {
    void *rep = arg;
    unsigned char buf[64];
    for (;;) {
        int n = zmq_recv(rep, buf, sizeof buf, 0);
        if (n < 0) break; /* ETERM: the main thread is done */
        if (zmq_send(rep, buf, n, 0) != n) break;
    }
    zmq_close(rep);
    return NULL;
}

static int by_value(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

static void reqrep(void) {
    void *rep_ctx = zmq_ctx_new();
    void *rep = bound(rep_ctx, ZMQ_REP);
    pthread_t t;
    if (pthread_create(&t, NULL, echoer, rep) != 0) exit(1);
    void *ctx = zmq_ctx_new();
    void *req = connected(ctx, ZMQ_REQ);
    send_payload(req); /* connection up */
    recv_payload(req);
    double *rtts = malloc(count * sizeof *rtts);
    if (!rtts) exit(1);
    for (long i = 0; i < count; i++) {
        double t0 = now();
        send_payload(req);
        recv_payload(req);
        rtts[i] = (now() - t0) * 1e6;
    }
    qsort(rtts, count, sizeof *rtts, by_value);
    /* the same percentile as aemp-bench's: sorted[(len - 1) * p] */
    double p50 = rtts[(long)((count - 1) * 0.5)], p99 = rtts[(long)((count - 1) * 0.99)];
    zmq_close(req);
    zmq_ctx_term(ctx);
    zmq_ctx_shutdown(rep_ctx); /* wakes the echoer with ETERM */
    pthread_join(t, NULL);
    zmq_ctx_term(rep_ctx);
    free(rtts);
    printf("%-36s %14.2f  %s\n", "zmq_reqrep_rtt_p50_us", p50,
           "round trip (REQ/REP, 13 bytes each way), median, µs");
    printf("%-36s %14.2f  %s\n", "zmq_reqrep_rtt_p99_us", p99,
           "round trip, 99th percentile, µs");
}

int main(int argc, char **argv) {
    const char *mode = "pushpull";
    count = -1;
    for (int i = 1; i < argc; i++) {
        if (strcmp(argv[i], "-n") == 0 && i + 1 < argc) {
            count = strtol(argv[++i], NULL, 10);
        } else if (strcmp(argv[i], "pushpull") == 0 || strcmp(argv[i], "reqrep") == 0) {
            mode = argv[i];
        } else {
            fprintf(stderr, "usage: pushpull [pushpull|reqrep] [-n COUNT]\n");
            return 2;
        }
    }
    if (strcmp(mode, "pushpull") == 0) {
        if (count < 0) count = 3000000;
        if (count < 1) count = 1;
        pushpull();
    } else {
        if (count < 0) count = 5000;
        if (count < 1) count = 1;
        reqrep();
    }
    return 0;
}
