/*
 * One end of a blkif ring, driven by the real io/ring.h macros, for the
 * Python interop test (tests/test_ring_c_interop.py).
 *
 *   ring_peer FILE front|back
 *
 * FILE is a 4 KiB file mapped MAP_SHARED; the Python test maps the same file
 * and plays the other end. Commands arrive one per line on stdin and every
 * command is answered before the next is read (lockstep):
 *
 *   init          front: SHARED_RING_INIT + FRONT_RING_INIT      -> "ok"
 *   attach I      FRONT_RING_ATTACH / BACK_RING_ATTACH at I       -> "ok"
 *   push N        front: N requests, RING_PUSH_REQUESTS_AND_CHECK_NOTIFY
 *                                                                 -> "notify 0|1"
 *   respond N     back: answer the N oldest consumed requests,
 *                 RING_PUSH_RESPONSES_AND_CHECK_NOTIFY            -> "notify 0|1"
 *   consume       take every published request/response: one line per entry
 *                 ("req|disc|ind|rsp ok|bad fields...") then "end COUNT"
 *   final         RING_FINAL_CHECK_FOR_REQUESTS/RESPONSES         -> "work COUNT"
 *   state         private indices                                 -> "state A B"
 *   quit
 *
 * Request number k (counting from 0 on each side) has contents derived from k
 * by make_request(); the Python test derives the same values, so each side
 * checks the other's bytes with memcmp and prints the fields as C sees them.
 */
#include <fcntl.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include <xen/xen.h>
#include <xen/io/blkif.h>

/* ring.h leaves the barriers to the includer for current interface versions. */
#ifndef xen_mb
#define xen_mb() __sync_synchronize()
#endif
#ifndef xen_rmb
#define xen_rmb() __asm__ __volatile__("" ::: "memory")
#endif
#ifndef xen_wmb
#define xen_wmb() __asm__ __volatile__("" ::: "memory")
#endif

#define RING_BYTES 4096
#define MAX_PENDING 64

static uint64_t mix(uint64_t k)
{
    return k * 0x9E3779B97F4A7C15ull + 0x0123456789ABCDEFull;
}

/* Must match expected_request() in test_ring_c_interop.py. */
static void make_request(uint64_t k, union blkif_sring_entry *e)
{
    memset(e, 0, sizeof(*e));
    if (k % 7 == 5) {
        blkif_request_discard_t *d = (blkif_request_discard_t *)&e->req;
        d->operation = BLKIF_OP_DISCARD;
        d->flag = (k / 7) % 2 ? BLKIF_DISCARD_SECURE : 0;
        d->handle = (uint16_t)(0x51 + k * 7);
        d->id = mix(k);
        d->sector_number = mix(k) >> 11;
        d->nr_sectors = 1 + k % 4096;
    } else if (k % 7 == 6) {
        blkif_request_indirect_t *r = (blkif_request_indirect_t *)&e->req;
        unsigned int j, pages;
        r->operation = BLKIF_OP_INDIRECT;
        r->indirect_op = (k / 7) % 2 ? BLKIF_OP_WRITE : BLKIF_OP_READ;
        r->nr_segments = (uint16_t)(1 + (k * 37) % 4096);
        r->id = mix(k);
        r->sector_number = mix(k) >> 13;
        r->handle = (uint16_t)(0x51 + k * 7);
        pages = (r->nr_segments + 511) / 512;
        for (j = 0; j < pages; j++)
            r->indirect_grefs[j] = (uint32_t)(k * 8 + j + 100);
    } else {
        blkif_request_t *r = &e->req;
        unsigned int j;
        r->operation = k % 2 ? BLKIF_OP_WRITE : BLKIF_OP_READ;
        r->nr_segments = (uint8_t)(1 + k % BLKIF_MAX_SEGMENTS_PER_REQUEST);
        r->handle = (uint16_t)(0x51 + k * 7);
        r->id = mix(k);
        r->sector_number = mix(k) >> 9;
        for (j = 0; j < r->nr_segments; j++) {
            uint8_t first = (uint8_t)((k + j) % 8);
            r->seg[j].gref = (uint32_t)(k * 16 + j + 8);
            r->seg[j].first_sect = first;
            r->seg[j].last_sect = (uint8_t)(first + (k * 3 + j) % (8 - first));
        }
    }
}

static uint8_t response_op(const union blkif_sring_entry *e)
{
    if (e->req.operation == BLKIF_OP_INDIRECT)
        return ((const blkif_request_indirect_t *)&e->req)->indirect_op;
    return e->req.operation;
}

/* Must match expected_response() in the test. */
static void make_response(uint64_t k, blkif_response_t *rsp)
{
    union blkif_sring_entry req;
    make_request(k, &req);
    memset(rsp, 0, sizeof(*rsp));
    rsp->id = req.req.id;
    rsp->operation = response_op(&req);
    rsp->status = (int16_t)-(int)(k % 3);
}

static void print_request(const union blkif_sring_entry *e, int ok)
{
    const char *verdict = ok ? "ok" : "bad";
    unsigned int j;
    if (e->req.operation == BLKIF_OP_DISCARD) {
        const blkif_request_discard_t *d = (const void *)&e->req;
        printf("disc %s %u %u %" PRIu64 " %" PRIu64 " %" PRIu64 "\n", verdict, d->flag,
               d->handle, d->id, d->sector_number, d->nr_sectors);
    } else if (e->req.operation == BLKIF_OP_INDIRECT) {
        const blkif_request_indirect_t *r = (const void *)&e->req;
        unsigned int pages = (r->nr_segments + 511) / 512;
        printf("ind %s %u %u %u %" PRIu64 " %" PRIu64, verdict, r->indirect_op,
               r->nr_segments, r->handle, r->id, r->sector_number);
        for (j = 0; j < pages && j < BLKIF_MAX_INDIRECT_PAGES_PER_REQUEST; j++)
            printf(" %u", r->indirect_grefs[j]);
        printf("\n");
    } else {
        const blkif_request_t *r = &e->req;
        printf("req %s %u %u %u %" PRIu64 " %" PRIu64, verdict, r->operation, r->nr_segments,
               r->handle, r->id, r->sector_number);
        for (j = 0; j < r->nr_segments && j < BLKIF_MAX_SEGMENTS_PER_REQUEST; j++)
            printf(" %u:%u:%u", r->seg[j].gref, r->seg[j].first_sect, r->seg[j].last_sect);
        printf("\n");
    }
}

static int run_front(blkif_sring_t *s, const char *cmd, unsigned long arg)
{
    static blkif_front_ring_t fr;
    static uint64_t next_req, next_rsp;
    int notify;

    if (!strcmp(cmd, "init")) {
        SHARED_RING_INIT(s);
        FRONT_RING_INIT(&fr, s, RING_BYTES);
        printf("ok\n");
    } else if (!strcmp(cmd, "attach")) {
        FRONT_RING_ATTACH(&fr, s, (RING_IDX)arg, RING_BYTES);
        printf("ok\n");
    } else if (!strcmp(cmd, "push")) {
        unsigned long i;
        if (arg > RING_FREE_REQUESTS(&fr)) {
            printf("error full\n");
            return 0;
        }
        for (i = 0; i < arg; i++) {
            /* req is the union's first member: the slot as a whole entry. */
            make_request(next_req++,
                         (union blkif_sring_entry *)RING_GET_REQUEST(&fr, fr.req_prod_pvt));
            fr.req_prod_pvt++;
        }
        RING_PUSH_REQUESTS_AND_CHECK_NOTIFY(&fr, notify);
        printf("notify %d\n", notify);
    } else if (!strcmp(cmd, "consume")) {
        RING_IDX rp = s->rsp_prod, n = 0;
        xen_rmb(); /* read responses only after reading rsp_prod */
        if (RING_RESPONSE_PROD_OVERFLOW(&fr, rp)) {
            printf("error overflow\n");
            return 0;
        }
        while (fr.rsp_cons != rp) {
            blkif_response_t got, want;
            /* memcpy, not RING_COPY_RESPONSE: a struct copy may skip padding,
             * and the test compares padding too. */
            memcpy(&got, RING_GET_RESPONSE(&fr, fr.rsp_cons), sizeof(got));
            make_response(next_rsp++, &want);
            printf("rsp %s %" PRIu64 " %u %d\n", memcmp(&got, &want, sizeof(got)) ? "bad" : "ok",
                   got.id, got.operation, got.status);
            fr.rsp_cons++;
            n++;
        }
        printf("end %u\n", n);
    } else if (!strcmp(cmd, "final")) {
        unsigned int work;
        RING_FINAL_CHECK_FOR_RESPONSES(&fr, work);
        printf("work %u\n", work);
    } else if (!strcmp(cmd, "state")) {
        printf("state %u %u\n", fr.req_prod_pvt, fr.rsp_cons);
    } else {
        return -1;
    }
    return 0;
}

static int run_back(blkif_sring_t *s, const char *cmd, unsigned long arg)
{
    static blkif_back_ring_t br;
    static uint64_t next_req, next_rsp;
    int notify;

    if (!strcmp(cmd, "attach")) {
        BACK_RING_ATTACH(&br, s, (RING_IDX)arg, RING_BYTES);
        printf("ok\n");
    } else if (!strcmp(cmd, "respond")) {
        unsigned long i;
        if (arg > next_req - next_rsp) {
            printf("error pending\n");
            return 0;
        }
        for (i = 0; i < arg; i++) {
            make_response(next_rsp++, RING_GET_RESPONSE(&br, br.rsp_prod_pvt));
            br.rsp_prod_pvt++;
        }
        RING_PUSH_RESPONSES_AND_CHECK_NOTIFY(&br, notify);
        printf("notify %d\n", notify);
    } else if (!strcmp(cmd, "consume")) {
        RING_IDX rc = br.req_cons, rp = s->req_prod, n = 0;
        xen_rmb(); /* read requests only after reading req_prod */
        if (RING_REQUEST_PROD_OVERFLOW(&br, rp)) {
            printf("error overflow\n");
            return 0;
        }
        while (rc != rp && !RING_REQUEST_CONS_OVERFLOW(&br, rc)) {
            union blkif_sring_entry got, want;
            /* A byte copy (padding included) for the byte-exact comparison. */
            memcpy(&got, RING_GET_REQUEST(&br, rc), sizeof(got));
            make_request(next_req++, &want);
            print_request(&got, !memcmp(&got, &want, sizeof(got)));
            br.req_cons = ++rc;
            n++;
        }
        printf("end %u\n", n);
    } else if (!strcmp(cmd, "final")) {
        unsigned int work;
        RING_FINAL_CHECK_FOR_REQUESTS(&br, work);
        printf("work %u\n", work);
    } else if (!strcmp(cmd, "state")) {
        printf("state %u %u\n", br.rsp_prod_pvt, br.req_cons);
    } else {
        return -1;
    }
    return 0;
}

int main(int argc, char **argv)
{
    char line[128], cmd[32];
    blkif_sring_t *s;
    int fd, front;

    if (argc != 3 || (strcmp(argv[2], "front") && strcmp(argv[2], "back"))) {
        fprintf(stderr, "usage: %s FILE front|back\n", argv[0]);
        return 2;
    }
    front = !strcmp(argv[2], "front");
    fd = open(argv[1], O_RDWR);
    if (fd < 0) {
        perror("open");
        return 1;
    }
    s = mmap(NULL, RING_BYTES, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    if (s == MAP_FAILED) {
        perror("mmap");
        return 1;
    }
    while (fgets(line, sizeof(line), stdin)) {
        unsigned long arg = 0;
        if (sscanf(line, "%31s %lu", cmd, &arg) < 1)
            continue;
        if (!strcmp(cmd, "quit"))
            break;
        if ((front ? run_front : run_back)(s, cmd, arg) < 0) {
            fprintf(stderr, "bad command for %s: %s", argv[2], line);
            return 1;
        }
        fflush(stdout);
    }
    munmap(s, RING_BYTES);
    close(fd);
    return 0;
}
