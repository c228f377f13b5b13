/*
 * The kernel's own ceiling for moving frames through a tap, one thread, no
 * runtime in between: creates tap IFNAME (IFF_TAP | IFF_NO_PI |
 * IFF_VNET_HDR, 12-byte header), brings it up, and for SECONDS either
 * writes the bytes of FILE (a vnet header followed by one frame, as
 * bench/raw_tap.ts writes them) in a loop, or reads whatever the host side
 * injects into the tap.
 *
 *   tap_ceiling IFNAME FILE write|writev|uring-writev nonblock|block SECONDS
 *   tap_ceiling IFNAME - readv|uring-readv nonblock 0
 *
 * Writes print "frames seconds errors cpu" after SECONDS, cpu being the
 * thread's own CPU time (user + system) in seconds: below the wall time
 * when other work shared the core, and then the better measure of the cost. Reads print "ready"
 * once the tap is up and read until killed: the bench counts the frames
 * the tap handed over (its tx counters) over its own window, with the same
 * injector, warm-up and counters as its rx64 test (bench/dpdk.ts, the
 * c-readv and c-uring-readv backends).
 *
 * write:  one write() of header + frame (one contiguous buffer);
 * writev: writev() of two iovecs, the header and the frame, as a backend
 *         that keeps the header apart from the frame does;
 * uring-writev: what vionet's writer does (parent/io/tx_drain.ts): 64
 *         IORING_OP_WRITEV per io_uring_enter, each of two iovecs (its own
 *         copy of the header, then the frame), the tap a registered file,
 *         every completion reaped before the next batch;
 * readv:  a busy loop of non-blocking readv() of two iovecs, a 2048-byte
 *         buffer (a virtio-user RX buffer: header + frame) and a 64 KiB
 *         overflow, as vionet's poller reads one frame;
 * uring-readv: what vionet's poller does (parent/io/rx_receiver.ts, the
 *         batched path): IORING_OP_READV with RWF_NOWAIT (an empty tap
 *         completes the read at once with -EAGAIN, nothing is punted to an
 *         io-wq worker), the same two iovecs per read, batches of 4 doubling
 *         up to 64 while they come back full and sized to twice what came
 *         otherwise, busy-looping as readv does.
 * nonblock/block: the fd's O_NONBLOCK, which decides whether tun may build a
 *         small frame's skb in a page fragment (tun_build_skb()). Reads are
 *         always non-blocking.
 *
 * Exit status 3: the kernel refused io_uring (uring-* modes only).
 *
 * io_uring is driven with raw system calls and <linux/io_uring.h>
 * (linux-libc-dev), no liburing. Built and run by bench/tap_ceiling.ts
 * inside a throw-away netns.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/fs.h>
#include <linux/if_tun.h>
#include <linux/io_uring.h>
#include <net/if.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

#define HDR_BYTES 12
#define MAX_BYTES (HDR_BYTES + 65550)
/* vionet's TX_BATCH and RX_BATCH (parent/io/tx_drain.ts, rx_receiver.ts). */
#define BATCH 64
/* vionet's poller starts a burst at this many reads (BURST_MIN). */
#define BURST_MIN 4
/* A virtio-user RX buffer: DPDK's 2176-byte mbuf less its 128-byte headroom. */
#define RX_BUFFER_BYTES 2048

static unsigned char frame[MAX_BYTES];
static unsigned char headers[BATCH][16];
static struct iovec iovs[BATCH][2];
static unsigned char rx_buffers[BATCH][RX_BUFFER_BYTES];
static unsigned char overflow[MAX_BYTES];

static double seconds_now(void)
{
	struct timespec t;

	clock_gettime(CLOCK_MONOTONIC, &t);
	return t.tv_sec + t.tv_nsec * 1e-9;
}

static double cpu_seconds(void)
{
	struct rusage u;

	getrusage(RUSAGE_SELF, &u);
	return u.ru_utime.tv_sec + u.ru_stime.tv_sec +
	       (u.ru_utime.tv_usec + u.ru_stime.tv_usec) * 1e-6;
}

static int fail(const char *what)
{
	fprintf(stderr, "tap_ceiling: %s: %s\n", what, strerror(errno));
	return 1;
}

static int link_up(const char *name)
{
	struct ifreq ifr;
	int s = socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0);
	int rc;

	if (s < 0)
		return -1;
	memset(&ifr, 0, sizeof(ifr));
	strncpy(ifr.ifr_name, name, IFNAMSIZ - 1);
	rc = ioctl(s, SIOCGIFFLAGS, &ifr);
	if (rc == 0) {
		ifr.ifr_flags |= IFF_UP;
		rc = ioctl(s, SIOCSIFFLAGS, &ifr);
	}
	close(s);
	return rc;
}

/* An io_uring of BATCH entries, its rings mapped; the set-up flags vionet's daemon uses. */
struct ring {
	int fd;
	unsigned *sq_tail, *sq_mask, *cq_head, *cq_tail, *cq_mask;
	struct io_uring_sqe *sqes;
	struct io_uring_cqe *cqes;
};

static int ring_setup(struct ring *r, int tap)
{
	/*
	 * vionet's rings are made during set-up for a worker to adopt, so they
	 * have SUBMIT_ALL | COOP_TASKRUN and not SINGLE_ISSUER/DEFER_TASKRUN
	 * (parent/io/io_uring.ts, RESTRICTED_FLAG_SETS); older kernels: none.
	 */
	static const unsigned flag_sets[] = {
		IORING_SETUP_SUBMIT_ALL | IORING_SETUP_COOP_TASKRUN, 0
	};
	struct io_uring_params p;
	unsigned char *sq, *cq;
	unsigned *array;
	size_t sq_bytes, cq_bytes;

	r->fd = -1;
	for (unsigned i = 0; i < 2 && r->fd < 0; i++) {
		memset(&p, 0, sizeof(p));
		p.flags = flag_sets[i];
		r->fd = syscall(__NR_io_uring_setup, BATCH, &p);
		if (r->fd < 0 && errno != EINVAL)
			break;
	}
	if (r->fd < 0) {
		fail("io_uring_setup");
		return 3; /* the kernel refuses io_uring: no batched figure here */
	}
	if (p.sq_entries < BATCH || p.cq_entries < BATCH) {
		fprintf(stderr, "tap_ceiling: io_uring gave %u/%u entries, want %d\n",
			p.sq_entries, p.cq_entries, BATCH);
		return 1;
	}
	sq_bytes = p.sq_off.array + p.sq_entries * sizeof(unsigned);
	cq_bytes = p.cq_off.cqes + p.cq_entries * sizeof(struct io_uring_cqe);
	sq = mmap(NULL, sq_bytes, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE, r->fd,
		  IORING_OFF_SQ_RING);
	cq = mmap(NULL, cq_bytes, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE, r->fd,
		  IORING_OFF_CQ_RING);
	r->sqes = mmap(NULL, p.sq_entries * sizeof(struct io_uring_sqe), PROT_READ | PROT_WRITE,
		       MAP_SHARED | MAP_POPULATE, r->fd, IORING_OFF_SQES);
	if (sq == MAP_FAILED || cq == MAP_FAILED || r->sqes == MAP_FAILED)
		return fail("mmap of the io_uring");
	r->sq_tail = (unsigned *)(sq + p.sq_off.tail);
	r->sq_mask = (unsigned *)(sq + p.sq_off.ring_mask);
	r->cq_head = (unsigned *)(cq + p.cq_off.head);
	r->cq_tail = (unsigned *)(cq + p.cq_off.tail);
	r->cq_mask = (unsigned *)(cq + p.cq_off.ring_mask);
	r->cqes = (struct io_uring_cqe *)(cq + p.cq_off.cqes);
	/* Ring slot i is SQE i, once and for all (as vionet does). */
	array = (unsigned *)(sq + p.sq_off.array);
	for (unsigned i = 0; i < p.sq_entries; i++)
		array[i] = i;
	/* The tap as registered file 0, as vionet's rings have it. */
	if (syscall(__NR_io_uring_register, r->fd, IORING_REGISTER_FILES, &tap, 1) < 0)
		return fail("IORING_REGISTER_FILES");
	return 0;
}

/* Queues request i of the next batch: opcode over iovs[i], fixed file 0. */
static void ring_queue(struct ring *r, unsigned i, int opcode, int rw_flags)
{
	unsigned tail = *r->sq_tail + i;
	struct io_uring_sqe *sqe = &r->sqes[tail & *r->sq_mask];

	memset(sqe, 0, sizeof(*sqe));
	sqe->opcode = opcode;
	sqe->flags = IOSQE_FIXED_FILE;
	sqe->fd = 0;
	sqe->addr = (unsigned long)iovs[i];
	sqe->len = 2;
	sqe->rw_flags = rw_flags;
	sqe->user_data = i;
}

/*
 * Submits n queued requests and waits for all n completions, each result
 * into results[user_data]. Returns 0, or -1 (errno set) when io_uring_enter
 * itself failed.
 */
static int ring_submit_all(struct ring *r, unsigned n, int *results)
{
	unsigned to_submit = n, outstanding = n;

	__atomic_store_n(r->sq_tail, *r->sq_tail + n, __ATOMIC_RELEASE);
	while (outstanding > 0) {
		long got = syscall(__NR_io_uring_enter, r->fd, to_submit, outstanding,
				   IORING_ENTER_GETEVENTS, NULL, 0);
		unsigned head, tail;

		if (got < 0) {
			if (errno != EINTR && errno != EAGAIN && errno != EBUSY)
				return -1;
		} else {
			to_submit -= (unsigned)got < to_submit ? (unsigned)got : to_submit;
		}
		head = *r->cq_head;
		tail = __atomic_load_n(r->cq_tail, __ATOMIC_ACQUIRE);
		while (head != tail) {
			struct io_uring_cqe *cqe = &r->cqes[head & *r->cq_mask];

			if (cqe->user_data < BATCH)
				results[cqe->user_data] = cqe->res;
			head++;
			outstanding--;
		}
		__atomic_store_n(r->cq_head, head, __ATOMIC_RELEASE);
	}
	return 0;
}

static int write_loop(int fd, const char *mode, int len, double limit)
{
	int vectored = !strcmp(mode, "writev"), batched = !strcmp(mode, "uring-writev");
	long frames = 0, errors = 0;
	int results[BATCH];
	double start, now, cpu0;
	struct ring r;

	for (int i = 0; i < BATCH; i++) {
		/* Each slot's own header copy, then the frame, as tx_drain.ts's slots. */
		memcpy(headers[i], frame, HDR_BYTES);
		iovs[i][0].iov_base = headers[i];
		iovs[i][0].iov_len = HDR_BYTES;
		iovs[i][1].iov_base = frame + HDR_BYTES;
		iovs[i][1].iov_len = len - HDR_BYTES;
	}
	if (batched) {
		int rc = ring_setup(&r, fd);

		if (rc)
			return rc;
	}
	start = seconds_now();
	cpu0 = cpu_seconds();
	do {
		if (batched) {
			for (int b = 0; b < 4096 / BATCH; b++) {
				for (int i = 0; i < BATCH; i++)
					ring_queue(&r, i, IORING_OP_WRITEV, 0);
				if (ring_submit_all(&r, BATCH, results))
					return fail("io_uring_enter");
				for (int i = 0; i < BATCH; i++) {
					if (results[i] == len)
						frames++;
					else
						errors++;
				}
			}
		} else {
			for (int i = 0; i < 4096; i++) {
				ssize_t n = vectored ? writev(fd, iovs[0], 2) : write(fd, frame, len);

				if (n == len)
					frames++;
				else
					errors++;
			}
		}
		now = seconds_now();
	} while (now - start < limit);
	printf("%ld %.6f %ld %.6f\n", frames, now - start, errors, cpu_seconds() - cpu0);
	return 0;
}

static int read_loop(int fd, const char *mode)
{
	int batched = !strcmp(mode, "uring-readv");
	unsigned burst = BURST_MIN;
	int results[BATCH];
	struct ring r;

	for (int i = 0; i < BATCH; i++) {
		iovs[i][0].iov_base = rx_buffers[i];
		iovs[i][0].iov_len = RX_BUFFER_BYTES;
		iovs[i][1].iov_base = overflow;
		iovs[i][1].iov_len = sizeof(overflow);
	}
	if (batched) {
		int rc = ring_setup(&r, fd);

		if (rc)
			return rc;
	}
	printf("ready\n");
	fflush(stdout);
	if (!batched) {
		for (;;)
			readv(fd, iovs[0], 2);
	}
	for (;;) {
		unsigned n = burst, got = 0, empty = 0;

		for (unsigned i = 0; i < n; i++)
			ring_queue(&r, i, IORING_OP_READV, RWF_NOWAIT);
		if (ring_submit_all(&r, n, results))
			return fail("io_uring_enter");
		for (unsigned i = 0; i < n; i++) {
			if (results[i] > 0)
				got++;
			else
				empty++;
		}
		/* vionet's rule: a full batch doubles the next, else twice what came. */
		if (empty)
			burst = got * 2 > BURST_MIN ? got * 2 : BURST_MIN;
		else
			burst = n * 2;
		if (burst > BATCH)
			burst = BATCH;
	}
}

int main(int argc, char **argv)
{
	struct ifreq ifr;
	double limit;
	int fd, file, len = 0, flags, reading, hdr = HDR_BYTES;
	const char *mode;

	mode = argc == 6 ? argv[3] : "";
	reading = !strcmp(mode, "readv") || !strcmp(mode, "uring-readv");
	if (argc != 6 || strlen(argv[1]) >= IFNAMSIZ ||
	    (strcmp(mode, "write") && strcmp(mode, "writev") && strcmp(mode, "uring-writev") &&
	     !reading) ||
	    (strcmp(argv[4], "nonblock") && strcmp(argv[4], "block")) ||
	    (reading && (strcmp(argv[2], "-") || strcmp(argv[4], "nonblock"))) ||
	    (!reading && atof(argv[5]) <= 0)) {
		fprintf(stderr, "usage: tap_ceiling IFNAME FILE write|writev|uring-writev nonblock|block SECONDS\n"
				"       tap_ceiling IFNAME - readv|uring-readv nonblock 0\n");
		return 2;
	}
	limit = atof(argv[5]);

	if (!reading) {
		file = open(argv[2], O_RDONLY | O_CLOEXEC);
		if (file < 0)
			return fail(argv[2]);
		len = read(file, frame, sizeof(frame));
		close(file);
		if (len < HDR_BYTES + 14) {
			fprintf(stderr, "tap_ceiling: %s: %d bytes, want a 12-byte header and a frame\n",
				argv[2], len);
			return 2;
		}
	}

	flags = O_RDWR | O_CLOEXEC;
	if (!strcmp(argv[4], "nonblock"))
		flags |= O_NONBLOCK;
	fd = open("/dev/net/tun", flags);
	if (fd < 0)
		return fail("/dev/net/tun");
	memset(&ifr, 0, sizeof(ifr));
	strncpy(ifr.ifr_name, argv[1], IFNAMSIZ - 1);
	ifr.ifr_flags = IFF_TAP | IFF_NO_PI | IFF_VNET_HDR;
	if (ioctl(fd, TUNSETIFF, &ifr) < 0)
		return fail("TUNSETIFF");
	if (ioctl(fd, TUNSETVNETHDRSZ, &hdr) < 0)
		return fail("TUNSETVNETHDRSZ");
	if (link_up(argv[1]) < 0)
		return fail("SIOCSIFFLAGS");

	return reading ? read_loop(fd, mode) : write_loop(fd, mode, len, limit);
}
