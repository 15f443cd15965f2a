/* C test of libmooncake_c: built with the system compiler by tests/c_program.rs.
 *   mooncake_c_test engine-target              serve a 1 MiB buffer; print "READY <segment> <addr>"; wait for the
 *                                               initiator's notification, check the bytes it wrote, exit 0.
 *   mooncake_c_test engine-initiator SEG ADDR  write a pattern into SEG at ADDR, read it back, check it, notify.
 *   mooncake_c_test store MASTER               the store API against a master at MASTER (host:port).
 *   mooncake_c_test bad-input                  null pointers, freed handles, bad lengths, unknown protocol.
 * Prints "OK <mode>" and exits 0 on success; prints "FAIL ..." and exits 1 otherwise. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "transfer_engine_c.h"
#include "store_c.h"
#include "mooncake_c.h" /* include guard: a second inclusion is harmless */

#define LEN (1 << 20)

#define CHECK(cond)                                                          \
    do {                                                                     \
        if (!(cond)) {                                                       \
            fprintf(stderr, "FAIL %s:%d: %s\n", __FILE__, __LINE__, #cond); \
            exit(1);                                                         \
        }                                                                    \
    } while (0)

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

static unsigned char pattern(size_t i) { return (unsigned char)((i * 7 + 3) % 251); }

static transfer_engine_t engine(void) {
    transfer_engine_t e = createTransferEngine("P2PHANDSHAKE", "127.0.0.1", "127.0.0.1", 0, 0);
    CHECK(e != NULL);
    CHECK(installTransport(e, "tcp", NULL) != NULL);
    return e;
}

static int wait_status(transfer_engine_t e, batch_id_t b, size_t task) {
    struct transfer_status st;
    double deadline = now() + 30;
    for (;;) {
        CHECK(getTransferStatus(e, b, task, &st) == 0);
        if (st.status != STATUS_WAITING && st.status != STATUS_PENDING) return st.status;
        CHECK(now() < deadline);
        usleep(200);
    }
}

static int engine_target(void) {
    transfer_engine_t e = engine();
    unsigned char *buf = calloc(1, LEN);
    CHECK(buf != NULL);
    CHECK(registerLocalMemory(e, buf, LEN, "cpu:0", 1) == 0);
    char name[128];
    CHECK(getLocalIpAndPort(e, name, sizeof name) == 0);
    printf("READY %s %llu\n", name, (unsigned long long)(uintptr_t)buf);
    fflush(stdout);
    double deadline = now() + 60;
    for (;;) {
        int n = 0;
        notify_msg_t *msgs = getNotifsFromEngine(e, &n);
        CHECK(n >= 0);
        int done = 0;
        for (int i = 0; i < n; i++) {
            if (strcmp(msgs[i].msg, "written") == 0 && strcmp(msgs[i].name, "initiator") == 0) done = 1;
        }
        CHECK(freeNotifsMsgBuf(msgs, n) == 0);
        if (done) break;
        CHECK(now() < deadline);
        usleep(1000);
    }
    for (size_t i = 0; i < LEN; i++) CHECK(buf[i] == pattern(i));
    CHECK(unregisterLocalMemory(e, buf) == 0);
    destroyTransferEngine(e);
    free(buf);
    printf("OK engine-target\n");
    return 0;
}

static int engine_initiator(const char *segment, unsigned long long remote) {
    transfer_engine_t e = engine();
    unsigned char *src = malloc(LEN), *back = calloc(1, LEN);
    CHECK(src != NULL && back != NULL);
    for (size_t i = 0; i < LEN; i++) src[i] = pattern(i);
    buffer_entry_t list[2] = {{src, LEN}, {back, LEN}};
    CHECK(registerLocalMemoryBatch(e, list, 2, "cpu:0") == 0);
    segment_id_t seg = openSegment(e, segment);
    CHECK(seg >= 0);

    batch_id_t b = allocateBatchID(e, 2);
    CHECK(b != INVALID_BATCH);
    struct transfer_request w = {OPCODE_WRITE, src, seg, 0, remote, LEN};
    CHECK(submitTransfer(e, b, &w, 1) == 0);
    CHECK(wait_status(e, b, 0) == STATUS_COMPLETED);
    struct transfer_request r = {OPCODE_READ, back, seg, 0, remote, LEN};
    notify_msg_t note = {"initiator", "written"};
    CHECK(submitTransferWithNotify(e, b, &r, 1, note) == 0);
    CHECK(wait_status(e, b, 1) == STATUS_COMPLETED);
    CHECK(memcmp(src, back, LEN) == 0);
    CHECK(freeBatchID(e, b) == 0);

    /* Out of the target's registered range: rejected, nothing moves. */
    b = allocateBatchID(e, 1);
    struct transfer_request oob = {OPCODE_WRITE, src, seg, 0, remote + LEN - 8, 64};
    int rc = submitTransfer(e, b, &oob, 1);
    if (rc == 0) CHECK(wait_status(e, b, 0) != STATUS_COMPLETED);
    CHECK(freeBatchID(e, b) == 0);

    void *addrs[2] = {src, back};
    CHECK(unregisterLocalMemoryBatch(e, addrs, 2) == 0);
    CHECK(closeSegment(e, seg) == 0);
    destroyTransferEngine(e);
    free(src);
    free(back);
    printf("OK engine-initiator\n");
    return 0;
}

static int store(const char *master) {
    mooncake_store_t s = mooncake_store_create();
    CHECK(s != NULL);
    CHECK(mooncake_store_setup(s, "127.0.0.1", "P2PHANDSHAKE", 16 << 20, 4 << 20, "tcp", "", master) == 0);
    CHECK(mooncake_store_health_check(s) == 0);
    const char *text = "bytes from a C program";
    CHECK(mooncake_store_put(s, "c/text", text, strlen(text), NULL) == 0);
    CHECK(mooncake_store_is_exist(s, "c/text") == 1);
    CHECK(mooncake_store_get_size(s, "c/text") == (int64_t)strlen(text));

    size_t n = 1 << 16;
    unsigned char *buf = malloc(2 * n);
    CHECK(buf != NULL);
    for (size_t i = 0; i < 2 * n; i++) buf[i] = pattern(i);
    CHECK(mooncake_store_register_buffer(s, buf, 2 * n) == 0);
    mooncake_replicate_config_t cfg = {1, 0, NULL, 0};
    CHECK(mooncake_store_put_from(s, "c/a", buf, n, &cfg) == 0);
    CHECK(mooncake_store_put_from(s, "c/a", buf, n, &cfg) == -705); /* OBJECT_ALREADY_EXISTS */
    const char *keys[2] = {"c/b", "c/c"};
    void *bufs[2] = {buf, buf + n};
    size_t sizes[2] = {n, n / 2};
    int results[2] = {1, 1};
    CHECK(mooncake_store_batch_put_from(s, keys, bufs, sizes, 2, &cfg, results) == 0);
    CHECK(results[0] == 0 && results[1] == 0);

    unsigned char *expect = malloc(2 * n);
    CHECK(expect != NULL);
    memcpy(expect, buf, 2 * n);
    memset(buf, 0, 2 * n);
    CHECK(mooncake_store_get_into(s, "c/a", buf, n) == (int64_t)n);
    CHECK(memcmp(buf, expect, n) == 0);
    CHECK(mooncake_store_get_into(s, "c/a", buf, 16) == -10); /* BUFFER_OVERFLOW */
    CHECK(mooncake_store_get_into(s, "c/none", buf, n) == -704); /* OBJECT_NOT_FOUND */
    memset(buf, 0, 2 * n);
    int64_t got[2] = {0, 0};
    size_t caps[2] = {n, n};
    CHECK(mooncake_store_batch_get_into(s, keys, bufs, caps, 2, got) == 0);
    CHECK(got[0] == (int64_t)n && got[1] == (int64_t)(n / 2));
    CHECK(memcmp(buf, expect, n) == 0 && memcmp(buf + n, expect + n, n / 2) == 0);
    const char *three[3] = {"c/a", "c/none", "c/c"};
    int exist[3] = {9, 9, 9};
    CHECK(mooncake_store_batch_is_exist(s, three, 3, exist) == 0);
    CHECK(exist[0] == 1 && exist[1] == 0 && exist[2] == 1);
    char host[128];
    CHECK(mooncake_store_get_hostname(s, host, sizeof host) == 0 && strlen(host) > 0);

    CHECK(mooncake_store_remove(s, "c/a", 1) == 0);
    CHECK(mooncake_store_remove(s, "c/a", 1) == -704);
    CHECK(mooncake_store_remove_by_regex(s, "^c/b$", 1) == 1);
    CHECK(mooncake_store_remove_all(s, 1) == 2);
    CHECK(mooncake_store_unregister_buffer(s, buf) == 0);
    mooncake_store_destroy(s);
    CHECK(mooncake_store_is_exist(s, "c/text") == -1); /* destroyed handle */

    /* The older client_c.h API. */
    client_t c = mooncake_client_create("127.0.0.1", "P2PHANDSHAKE", "tcp", "", master);
    CHECK(c != NULL);
    CHECK(mooncake_client_mount_segment(c, 16 << 20) == MOONCAKE_ERROR_OK);
    CHECK(mooncake_client_register_local_memory(c, buf, 2 * n, "cpu:0", true, true) == MOONCAKE_ERROR_OK);
    memcpy(buf, expect, 2 * n);
    Slice_t parts[2] = {{buf, 100}, {buf + n, 300}};
    ReplicateConfig_t rc = {1, NULL};
    CHECK(mooncake_client_put(c, "legacy", parts, 2, rc) == MOONCAKE_ERROR_OK);
    CHECK(mooncake_client_isexist(c, "legacy") == MOONCAKE_ERROR_OK);
    memset(buf, 0, 2 * n);
    Slice_t whole = {buf, 400};
    CHECK(mooncake_client_get(c, "legacy", &whole, 1) == MOONCAKE_ERROR_OK);
    CHECK(memcmp(buf, expect, 100) == 0 && memcmp(buf + 100, expect + n, 300) == 0);
    CHECK(mooncake_client_remove(c, "legacy") == MOONCAKE_ERROR_OBJECT_HAS_LEASE); /* the read leased it */
    CHECK(mooncake_client_remove(c, "none") == MOONCAKE_ERROR_OBJECT_NOT_FOUND);
    CHECK(mooncake_client_isexist(c, "none") == MOONCAKE_ERROR_OBJECT_NOT_FOUND);
    CHECK(mooncake_client_unregister_local_memory(c, buf, true) == MOONCAKE_ERROR_OK);
    CHECK(mooncake_max_slice_size() == (16u << 20) - 16);
    mooncake_client_destroy(c);
    CHECK(mooncake_client_isexist(c, "legacy") == MOONCAKE_ERROR_INVALID_PARAMS);
    free(buf);
    free(expect);
    printf("OK store\n");
    return 0;
}

static int bad_input(void) {
    CHECK(createTransferEngine(NULL, "127.0.0.1", NULL, 0, 0) == NULL);
    transfer_engine_t e = createTransferEngine("P2PHANDSHAKE", "127.0.0.1", NULL, 0, 0);
    CHECK(e != NULL);
    CHECK(installTransport(e, "warp-drive", NULL) == NULL); /* unknown protocol */
    CHECK(installTransport(e, NULL, NULL) == NULL);
    CHECK(installTransport(e, "tcp", NULL) != NULL);
    char small[4];
    CHECK(getLocalIpAndPort(e, small, sizeof small) == -1);
    CHECK(registerLocalMemory(e, NULL, 64, "cpu:0", 1) == -1);
    CHECK(registerLocalMemoryBatch(e, NULL, 3, "cpu:0") == -1);
    CHECK(openSegment(e, NULL) < 0);
    CHECK(allocateBatchID(e, 0) == INVALID_BATCH);
    batch_id_t b = allocateBatchID(e, 1);
    CHECK(b != INVALID_BATCH);
    CHECK(submitTransfer(e, b, NULL, 1) == -1);
    CHECK(getTransferStatus(e, b, 0, NULL) == -1);
    struct transfer_status st;
    CHECK(getTransferStatus(e, b + 99, 0, &st) == -1);
    CHECK(freeBatchID(e, b) == 0);
    CHECK(freeBatchID(e, b) == -1);
    destroyTransferEngine(e);
    destroyTransferEngine(e); /* twice: ignored */
    CHECK(allocateBatchID(e, 1) == INVALID_BATCH);
    CHECK(openSegment(e, "127.0.0.1:1") == -1);
    CHECK(installTransport(e, "tcp", NULL) == NULL);
    CHECK(allocateBatchID((transfer_engine_t)(uintptr_t)0x7777, 1) == INVALID_BATCH);

    mooncake_store_t s = mooncake_store_create();
    CHECK(s != NULL);
    CHECK(mooncake_store_put(s, "k", "v", 1, NULL) == -1); /* not set up */
    CHECK(mooncake_store_setup(NULL, NULL, NULL, 0, 0, NULL, NULL, NULL) == -1);
    mooncake_store_destroy(s);
    CHECK(mooncake_store_is_exist(s, "k") == -1);
    CHECK(mooncake_store_remove_all(s, 1) == -1);
    mooncake_store_destroy(s);
    mooncake_store_destroy(NULL);
    printf("OK bad-input\n");
    return 0;
}

int main(int argc, char **argv) {
    if (argc >= 2 && strcmp(argv[1], "engine-target") == 0) return engine_target();
    if (argc >= 4 && strcmp(argv[1], "engine-initiator") == 0)
        return engine_initiator(argv[2], strtoull(argv[3], NULL, 10));
    if (argc >= 3 && strcmp(argv[1], "store") == 0) return store(argv[2]);
    if (argc >= 2 && strcmp(argv[1], "bad-input") == 0) return bad_input();
    fprintf(stderr, "usage: %s engine-target | engine-initiator SEG ADDR | store MASTER | bad-input\n", argv[0]);
    return 2;
}
