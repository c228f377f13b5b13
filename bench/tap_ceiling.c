/*
 * The kernel's own ceiling for putting frames on a tap, one thread, no
 * runtime in between: creates tap IFNAME (IFF_TAP | IFF_NO_PI |
 * IFF_VNET_HDR, 12-byte header), brings it up, and writes the bytes of FILE
 * (a vnet header followed by one frame, as bench/raw_tap.ts writes them) in a
 * loop for SECONDS. Prints "frames seconds errors".
 *
 *   tap_ceiling IFNAME FILE write|writev nonblock|block SECONDS
 *
 * write:  one write() of header + frame (one contiguous buffer);
 * writev: writev() of two iovecs, the header and the frame, as a backend
 *         that keeps the header apart from the frame does.
 * nonblock/block: the fd's O_NONBLOCK, which decides whether tun may build a
 *         small frame's skb in a page fragment (tun_build_skb()).
 *
 * Built and run by bench/tap_ceiling.ts inside a throw-away netns.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/if_tun.h>
#include <net/if.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

#define HDR_BYTES 12
#define MAX_BYTES (HDR_BYTES + 65550)

static unsigned char frame[MAX_BYTES];

static double seconds_now(void)
{
	struct timespec t;

	clock_gettime(CLOCK_MONOTONIC, &t);
	return t.tv_sec + t.tv_nsec * 1e-9;
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

int main(int argc, char **argv)
{
	struct ifreq ifr;
	struct iovec iov[2];
	double start, now, limit;
	long frames = 0, errors = 0;
	int fd, file, len, vectored, flags, hdr = HDR_BYTES;

	if (argc != 6 || strlen(argv[1]) >= IFNAMSIZ ||
	    (strcmp(argv[3], "write") && strcmp(argv[3], "writev")) ||
	    (strcmp(argv[4], "nonblock") && strcmp(argv[4], "block")) ||
	    atof(argv[5]) <= 0) {
		fprintf(stderr, "usage: tap_ceiling IFNAME FILE write|writev nonblock|block SECONDS\n");
		return 2;
	}
	vectored = !strcmp(argv[3], "writev");
	limit = atof(argv[5]);

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

	iov[0].iov_base = frame;
	iov[0].iov_len = HDR_BYTES;
	iov[1].iov_base = frame + HDR_BYTES;
	iov[1].iov_len = len - HDR_BYTES;
	start = seconds_now();
	do {
		for (int i = 0; i < 4096; i++) {
			ssize_t n = vectored ? writev(fd, iov, 2) : write(fd, frame, len);

			if (n == len)
				frames++;
			else
				errors++;
		}
		now = seconds_now();
	} while (now - start < limit);
	printf("%ld %.6f %ld\n", frames, now - start, errors);
	return 0;
}
