#include "storage/file_util.h"

#include <fcntl.h>
#include <gtest/gtest.h>
#include <sys/stat.h>
#include <unistd.h>

#include <chrono>
#include <filesystem>
#include <future>
#include <string>

#include "tests/testing/testing.h"

namespace sqkv {
namespace {

using ::sqkv::testing::ReadBytes;
using ::sqkv::testing::ScratchDir;
using ::sqkv::testing::WriteBytes;

// Runs the test body with `dir` as the working directory, then restores the old one.
class InDirectory {
 public:
  explicit InDirectory(const std::filesystem::path& dir) : old_(std::filesystem::current_path()) {
    std::filesystem::current_path(dir);
  }
  ~InDirectory() { std::filesystem::current_path(old_); }

 private:
  std::filesystem::path old_;
};

TEST(FileUtil, OpenRegularFileRefusesAFifoWithoutBlocking) {
  ScratchDir dir;
  const std::string fifo = dir.file("f.npy");
  ASSERT_EQ(::mkfifo(fifo.c_str(), 0600), 0);
  auto opened = std::async(std::launch::async, [&] {
    int fd = -1;
    uint64_t size = 0;
    return OpenRegularFile(fifo, &fd, &size);
  });
  if (opened.wait_for(std::chrono::seconds(10)) != std::future_status::ready) {
    // Blocked waiting for a writer: be that writer so the call returns and the test can end.
    const int w = ::open(fifo.c_str(), O_WRONLY | O_NONBLOCK);
    opened.wait();
    if (w >= 0) ::close(w);
    FAIL() << "OpenRegularFile blocked on a FIFO";
  }
  const Status s = opened.get();
  EXPECT_TRUE(s.IsInvalidArgument()) << s.ToString();
  EXPECT_NE(s.message().find("not a regular file"), std::string::npos) << s.ToString();
}

TEST(FileUtil, OpenRegularFileReadsBlockingAfterTheCheck) {
  ScratchDir dir;
  const std::string path = dir.file("a");
  WriteBytes(path, "hello");
  int fd = -1;
  uint64_t size = 0;
  ASSERT_TRUE(OpenRegularFile(path, &fd, &size).ok());
  EXPECT_EQ(size, 5u);
  EXPECT_EQ(::fcntl(fd, F_GETFL) & O_NONBLOCK, 0);
  ::close(fd);
  EXPECT_TRUE(OpenRegularFile(dir.file("missing"), &fd, &size).IsNotFound());
  EXPECT_EQ(fd, -1);
}

// A bare name lives in "."; the parent's fsync must not look for a directory called "".
TEST(FileUtil, RenameDurableOfBareNamesSucceeds) {
  ScratchDir dir;
  InDirectory cd(dir.path());
  WriteBytes("a", "new");
  WriteBytes("b", "old");
  const Status s = RenameDurable("a", "b");
  EXPECT_TRUE(s.ok()) << s.ToString();
  EXPECT_EQ(ReadBytes("b"), "new");
  EXPECT_FALSE(std::filesystem::exists("a"));
  // A missing source is NotFound and changes nothing.
  EXPECT_TRUE(RenameDurable("a", "b").IsNotFound());
  EXPECT_EQ(ReadBytes("b"), "new");
}

TEST(FileUtil, RenameDurableAcrossDirectories) {
  ScratchDir dir;
  ASSERT_TRUE(EnsureDir(dir.file("x")).ok());
  ASSERT_TRUE(EnsureDir(dir.file("y")).ok());
  WriteBytes(dir.file("x/a"), "moved");
  ASSERT_TRUE(RenameDurable(dir.file("x/a"), dir.file("y/b")).ok());
  EXPECT_EQ(ReadBytes(dir.file("y/b")), "moved");
  EXPECT_FALSE(std::filesystem::exists(dir.file("x/a")));
}

TEST(FileUtil, EnsureDirCreatesNestedAndBareDirectories) {
  ScratchDir dir;
  ASSERT_TRUE(EnsureDir(dir.file("p/q/r/")).ok());
  EXPECT_TRUE(std::filesystem::is_directory(dir.file("p/q/r")));
  ASSERT_TRUE(EnsureDir(dir.file("p/q")).ok());  // existing: nothing to do
  {
    InDirectory cd(dir.path());
    const Status s = EnsureDir("bare");
    EXPECT_TRUE(s.ok()) << s.ToString();
  }
  EXPECT_TRUE(std::filesystem::is_directory(dir.file("bare")));
  WriteBytes(dir.file("file"), "x");
  EXPECT_FALSE(EnsureDir(dir.file("file/sub")).ok());
}

TEST(FileUtil, WriteFileAtomicallyOfABareName) {
  ScratchDir dir;
  InDirectory cd(dir.path());
  ASSERT_TRUE(WriteFileAtomically("w", {"ab", "", "cd"}).ok());
  EXPECT_EQ(ReadBytes("w"), "abcd");
}

}  // namespace
}  // namespace sqkv
