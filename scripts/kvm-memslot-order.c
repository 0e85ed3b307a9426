/*
 * How long KVM takes to register 256 MiB of guest RAM depending on when:
 * the measurement behind vmm registering RAM before it creates the irqchip
 * (README, "The slow registration came right after the irqchip").
 *
 *   cc -O2 -o /tmp/kvm-order scripts/kvm-memslot-order.c
 *   for i in 1 2 3 4 5 6; do /tmp/kvm-order 1 0; /tmp/kvm-order 1 20; /tmp/kvm-order 2 0; done
 *
 * MODE 1: KVM_CREATE_IRQCHIP, then (after SLEEP ms) the memory slot.
 * MODE 2: the memory slot, then KVM_CREATE_IRQCHIP (vmm's order).
 * Then, in both: KVM_CREATE_PIT2, a KVM_IRQFD and a KVM_IOEVENTFD. Prints
 * the milliseconds each ioctl took.
 */
#include <fcntl.h>
#include <linux/kvm.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/eventfd.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

static double now(void)
{
	struct timespec t;
	clock_gettime(CLOCK_MONOTONIC, &t);
	return t.tv_sec + t.tv_nsec / 1e9;
}

/* Runs one ioctl and returns the milliseconds it took; exits if it fails. */
static double timed(int fd, unsigned long req, void *arg, const char *name)
{
	double t0 = now();
	if (ioctl(fd, req, arg) < 0) {
		perror(name);
		exit(1);
	}
	return (now() - t0) * 1e3;
}

int main(int argc, char **argv)
{
	if (argc != 3) {
		fprintf(stderr, "usage: %s MODE(1|2) SLEEP_MS\n", argv[0]);
		return 2;
	}
	int mode = atoi(argv[1]), pause_ms = atoi(argv[2]);
	size_t size = 256 << 20;
	int kvm = open("/dev/kvm", O_RDWR);
	if (kvm < 0) {
		perror("/dev/kvm");
		return 1;
	}
	int vm = ioctl(kvm, KVM_CREATE_VM, 0);
	if (vm < 0 || ioctl(vm, KVM_SET_TSS_ADDR, 0xfffbd000) < 0) {
		perror("KVM_CREATE_VM");
		return 1;
	}
	void *ram = mmap(0, size, PROT_READ | PROT_WRITE,
			 MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
	struct kvm_userspace_memory_region slot = {
		.slot = 0, .memory_size = size, .userspace_addr = (unsigned long)ram,
	};
	double slot_ms, irqchip_ms;
	if (mode == 1) {
		irqchip_ms = timed(vm, KVM_CREATE_IRQCHIP, 0, "KVM_CREATE_IRQCHIP");
		usleep(pause_ms * 1000);
		slot_ms = timed(vm, KVM_SET_USER_MEMORY_REGION, &slot, "slot");
	} else {
		slot_ms = timed(vm, KVM_SET_USER_MEMORY_REGION, &slot, "slot");
		irqchip_ms = timed(vm, KVM_CREATE_IRQCHIP, 0, "KVM_CREATE_IRQCHIP");
	}
	struct kvm_pit_config pit = { .flags = KVM_PIT_SPEAKER_DUMMY };
	double pit_ms = timed(vm, KVM_CREATE_PIT2, &pit, "KVM_CREATE_PIT2");
	struct kvm_irqfd irqfd = { .fd = eventfd(0, 0), .gsi = 5 };
	double irqfd_ms = timed(vm, KVM_IRQFD, &irqfd, "KVM_IRQFD");
	struct kvm_ioeventfd io = { .addr = 0xd0000050, .len = 4, .fd = eventfd(0, 0) };
	double io_ms = timed(vm, KVM_IOEVENTFD, &io, "KVM_IOEVENTFD");
	printf("mode %d pause %2d ms: slot %.2f irqchip %.2f pit %.2f irqfd %.2f ioeventfd %.2f ms\n",
	       mode, pause_ms, slot_ms, irqchip_ms, pit_ms, irqfd_ms, io_ms);
	return 0;
}
