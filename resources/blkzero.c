/*
 * blkzero: BLKZEROOUT or BLKDISCARD on a byte range of a block device, the
 * two ioctls the guest's busybox cannot issue (BLKZEROOUT) or issue with
 * exact ranges (BLKDISCARD). Built static by the guest tests
 * (tests/tests/zeroes_and_discards.rs) and run inside the guest.
 *
 *   blkzero zeroout|discard DEVICE OFFSET LENGTH
 *
 * Linux sends BLKZEROOUT to virtio-blk as WRITE_ZEROES with unmap=0
 * (BLKDEV_ZERO_NOUNMAP) and BLKDISCARD as DISCARD. Exit status: 0 done,
 * 1 the ioctl failed, 2 bad arguments.
 */
#include <errno.h>
#include <fcntl.h>
#include <linux/fs.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <unistd.h>

static int parse(const char *text, uint64_t *value)
{
	char *end;

	errno = 0;
	*value = strtoull(text, &end, 0);
	return errno == 0 && end != text && *end == '\0';
}

int main(int argc, char **argv)
{
	unsigned long request;
	uint64_t range[2];
	int fd;

	if (argc != 5 || !parse(argv[3], &range[0]) || !parse(argv[4], &range[1])) {
		fprintf(stderr, "usage: blkzero zeroout|discard DEVICE OFFSET LENGTH\n");
		return 2;
	}
	if (strcmp(argv[1], "zeroout") == 0) {
		request = BLKZEROOUT;
	} else if (strcmp(argv[1], "discard") == 0) {
		request = BLKDISCARD;
	} else {
		fprintf(stderr, "blkzero: unknown operation '%s'\n", argv[1]);
		return 2;
	}
	fd = open(argv[2], O_WRONLY);
	if (fd < 0) {
		fprintf(stderr, "blkzero: %s: %s\n", argv[2], strerror(errno));
		return 1;
	}
	if (ioctl(fd, request, range) != 0) {
		fprintf(stderr, "blkzero: %s %s: %s\n", argv[1], argv[2], strerror(errno));
		close(fd);
		return 1;
	}
	close(fd);
	return 0;
}
