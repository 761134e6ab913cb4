#include "storage/file_util.h"

#include <dirent.h>
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>
#include <xxhash.h>

#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <filesystem>

namespace sqkv {
namespace {

// The directory holding `path`: "." for a bare name.
std::string ParentDir(const std::string& path) {
  std::string dir = std::filesystem::path(path).parent_path().string();
  return dir.empty() ? "." : dir;
}

// A failure after a rename put the new file in place: a crash may still bring the old one back.
// Always IOError, whatever the cause's code (a NotFound would read as "nothing was written").
Status NotDurable(const std::string& path, const Status& cause) {
  return Status::IOError(path + " was replaced but may not be durable: " + cause.message());
}

}  // namespace

Status ErrnoStatus(const std::string& what, const std::string& path, int err) {
  std::string msg = what + " " + path + ": " + std::strerror(err);
  if (err == ENOENT) return Status::NotFound(msg);
  return Status::IOError(msg);
}

Status EnsureDir(const std::string& path) {
  // The missing directories, deepest first; each new one is then made durable in its parent.
  std::filesystem::path p(path);
  if (!p.has_filename()) p = p.parent_path();  // "a/b/" names "a/b"
  std::vector<std::string> missing;
  std::error_code ec;
  for (; !p.empty() && !std::filesystem::exists(p, ec); p = p.parent_path()) {
    missing.push_back(p.string());
  }
  std::filesystem::create_directories(path, ec);
  if (ec) return Status::IOError("create directory " + path + ": " + ec.message());
  for (auto it = missing.rbegin(); it != missing.rend(); ++it) {
    SQKV_RETURN_IF_ERROR(FsyncDir(ParentDir(*it)));
  }
  return Status::Ok();
}

Status FsyncDir(const std::string& path) {
  int fd = ::open(path.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (fd < 0) return ErrnoStatus("open directory", path, errno);
  int rc = ::fsync(fd);
  int err = errno;
  ::close(fd);
  if (rc != 0) return ErrnoStatus("fsync directory", path, err);
  return Status::Ok();
}

Status RenameDurable(const std::string& from, const std::string& to) {
  if (::rename(from.c_str(), to.c_str()) != 0) return ErrnoStatus("rename to " + to, from, errno);
  const std::string to_dir = ParentDir(to), from_dir = ParentDir(from);
  Status s = FsyncDir(to_dir);
  if (s.ok() && std::filesystem::path(from_dir) != std::filesystem::path(to_dir)) {
    s = FsyncDir(from_dir);
  }
  return s.ok() ? s : NotDurable(to, s);
}

Status RemoveFile(const std::string& path) {
  if (::unlink(path.c_str()) != 0 && errno != ENOENT) return ErrnoStatus("remove", path, errno);
  return Status::Ok();
}

Status ListFiles(const std::string& dir, std::vector<std::string>* names) {
  names->clear();
  DIR* d = ::opendir(dir.c_str());
  if (d == nullptr) return ErrnoStatus("list", dir, errno);
  while (dirent* e = ::readdir(d)) {
    if (e->d_type == DT_REG || e->d_type == DT_UNKNOWN) {
      std::string n = e->d_name;
      if (n != "." && n != "..") names->push_back(std::move(n));
    }
  }
  ::closedir(d);
  return Status::Ok();
}

Result<uint64_t> FileSize(const std::string& path) {
  struct stat st {};
  if (::stat(path.c_str(), &st) != 0) return ErrnoStatus("stat", path, errno);
  return static_cast<uint64_t>(st.st_size);
}

Status OpenRegularFile(const std::string& path, int* fd, uint64_t* size) {
  // O_NONBLOCK: opening a FIFO for reading would otherwise wait for a writer before the check.
  *fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC | O_NONBLOCK);
  if (*fd < 0) return ErrnoStatus("cannot open", path, errno);
  auto fail = [fd](Status s) {
    ::close(*fd);
    *fd = -1;
    return s;
  };
  struct stat st {};
  if (::fstat(*fd, &st) != 0) return fail(ErrnoStatus("cannot stat", path, errno));
  if (!S_ISREG(st.st_mode)) return fail(Status::InvalidArgument(path + ": not a regular file"));
  const int flags = ::fcntl(*fd, F_GETFL);
  if (flags < 0 || ::fcntl(*fd, F_SETFL, flags & ~O_NONBLOCK) != 0) {
    return fail(ErrnoStatus("cannot clear O_NONBLOCK on", path, errno));
  }
  *size = static_cast<uint64_t>(st.st_size);
  return Status::Ok();
}

Status PreadFull(int fd, uint64_t offset, size_t bytes, void* dst, const std::string& path,
                 size_t* got) {
  auto* p = static_cast<uint8_t*>(dst);
  *got = 0;
  while (*got < bytes) {
    const ssize_t n = ::pread(fd, p + *got, bytes - *got, static_cast<off_t>(offset + *got));
    if (n < 0 && errno == EINTR) continue;
    if (n < 0 && path.empty()) {
      return Status::IOError(std::string("cannot read: ") + std::strerror(errno));
    }
    if (n < 0) return ErrnoStatus("cannot read", path, errno);
    if (n == 0) break;  // end of file
    *got += static_cast<size_t>(n);
  }
  return Status::Ok();
}

uint64_t DirectoryBytes(const std::string& dir) {
  uint64_t total = 0;
  std::error_code ec;
  for (auto it = std::filesystem::recursive_directory_iterator(dir, ec);
       !ec && it != std::filesystem::recursive_directory_iterator(); it.increment(ec)) {
    if (it->is_regular_file(ec)) total += it->file_size(ec);
  }
  return total;
}

Status WriteFileAtomically(const std::string& path, const std::vector<std::string_view>& parts) {
  std::string tmp = path + ".tmp-XXXXXX";
  const int fd = mkstemp(tmp.data());
  if (fd < 0) return ErrnoStatus("cannot create a temporary file for", path, errno);
  auto fail = [&](const std::string& what) {
    Status st = ErrnoStatus(what, tmp, errno);
    close(fd);
    unlink(tmp.c_str());
    return st;
  };
  if (fchmod(fd, 0644) != 0) return fail("cannot chmod");
  for (std::string_view part : parts) {
    while (!part.empty()) {
      const ssize_t n = write(fd, part.data(), part.size());
      if (n < 0 && errno == EINTR) continue;
      if (n <= 0) return fail("cannot write");
      part.remove_prefix(static_cast<size_t>(n));
    }
  }
  if (fsync(fd) != 0) return fail("cannot fsync");
  if (close(fd) != 0) {
    Status st = ErrnoStatus("cannot close", tmp, errno);
    unlink(tmp.c_str());
    return st;
  }
  if (rename(tmp.c_str(), path.c_str()) != 0) {
    Status st = ErrnoStatus("cannot rename " + tmp + " to", path, errno);
    unlink(tmp.c_str());
    return st;
  }
  Status st = FsyncDir(ParentDir(path));
  return st.ok() ? st : NotDurable(path, st);
}

uint64_t Checksum64(const void* data, size_t bytes) { return XXH3_64bits(data, bytes); }

}  // namespace sqkv
